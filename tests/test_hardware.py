"""The GPU visibility check (selftrain/hardware.py): with a fake `nvidia-smi` on PATH that lists a GPU, a run on
this machine's CPU build of torch stops before any stage and says why; and the vLLM feature check's message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selftrain.hardware import (
    ALLOW_CPU_ENV,
    NvidiaSmi,
    check_gpu_visible,
    gpu_problem,
    read_nvidia_smi,
    vllm_expected_scoring_problem,
)
from selftrain.paths import project_root

HEADER = """Tue Dec  1 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
"""


def fake_smi(folder: Path, listing: str = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b)", rc: int = 0) -> Path:
    """A stand-in for the system tool: `nvidia-smi -L` prints `listing`, plain `nvidia-smi` the header above."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(  # shell builtins only: a test may leave nothing else on PATH
        f'#!/bin/sh\nif [ "$1" = "-L" ]; then printf "%s\\n" "{listing}"; exit {rc}; fi\nprintf \'%s\' \'{HEADER}\'\n'
    )
    exe.chmod(0o755)
    return folder


def run_cli(args: list[str], smi_dir: Path | None, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in (ALLOW_CPU_ENV, "CUDA_VISIBLE_DEVICES")}
    e["PYTHONPATH"] = str(project_root())
    if smi_dir is not None:
        e["PATH"] = f"{smi_dir}{os.pathsep}{e['PATH']}"
    e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "selftrain", *args],
        capture_output=True,
        text=True,
        cwd=project_root(),
        env=e,
        timeout=600,
    )


# `--stages nosuch` / `--model nosuch` make the old code fail at once instead of running a study.
RUN = ["run", "--study", "params/studies/quick.yaml", "--stages", "nosuch"]
SHARD = ["shard", "--study", "params/studies/quick.yaml", "--model", "nosuch", "--shard", "0"]


@pytest.mark.integration
@pytest.mark.parametrize("args", [RUN, SHARD], ids=["run", "shard"])
def test_run_stops_before_any_stage_when_torch_cannot_see_the_listed_gpu(tmp_path, args):
    r = run_cli(args, fake_smi(tmp_path / "bin"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: nvidia-smi lists 1 GPU(s) (GPU 0: NVIDIA H100 80GB HBM3) but torch 2.13.0")
    assert "CPU build (torch.version.cuda is None; driver 535.104.05 runs CUDA <= 12.2)" in err
    assert "locks/cuda12-linux-x86_64.txt" in err and f"{ALLOW_CPU_ENV}=1" in err
    assert "unknown stage" not in r.stderr and "not in the study" not in r.stderr  # before the study was read


@pytest.mark.integration
def test_allowed_cpu_and_hidden_gpus_run_on(tmp_path):
    smi = fake_smi(tmp_path / "bin")
    for env in ({ALLOW_CPU_ENV: "1"}, {"CUDA_VISIBLE_DEVICES": ""}):
        r = run_cli(RUN, smi, **env)
        assert r.returncode == 2 and "unknown stage(s) ['nosuch']" in r.stderr, (env, r.stderr)
        assert "nvidia-smi lists" not in r.stderr


@pytest.mark.integration
def test_check_reports_and_fails_on_the_listed_gpu(tmp_path):
    r = run_cli(["check"], fake_smi(tmp_path / "bin"))
    assert r.returncode == 2
    assert "params files OK" in r.stdout
    assert "torch 2.13.0+cpu (CPU build); GPUs torch sees: 0" in r.stdout
    assert "nvidia-smi: 1 GPU(s), driver 535.104.05, CUDA <= 12.2" in r.stdout
    assert "vLLM 0.32.0: judge.scoring expected supported" in r.stdout
    assert "error: nvidia-smi lists 1 GPU(s)" in r.stderr


def test_no_gpu_listed_is_no_problem(tmp_path, monkeypatch):
    # No nvidia-smi at all (this machine), one whose driver is not loaded, one that lists nothing.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert read_nvidia_smi() is None
    check_gpu_visible()
    bad = fake_smi(tmp_path / "bad", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", 9)
    monkeypatch.setenv("PATH", str(bad))
    assert read_nvidia_smi() is None
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path / "none", "No devices found.")))
    assert read_nvidia_smi() is None
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path / "one")))
    smi = read_nvidia_smi()
    assert smi == NvidiaSmi(["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b)"], "535.104.05", "12.2")


def test_driver_older_than_the_cuda_build_is_named():
    smi = NvidiaSmi(["GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-x)"], "550.54.15", "12.4")
    major = gpu_problem(smi, "2.13.0", "13.0", False, None, "The NVIDIA driver on your system is too old")
    assert "built for CUDA 13.0 and the driver 550.54.15 runs CUDA <= 12.4: install the CUDA 12 lock" in major
    assert "(torch: The NVIDIA driver on your system is too old)" in major
    minor = gpu_problem(smi, "2.10.0", "12.8", False)
    assert "built for CUDA 12.8" in minor and "older minor version" in minor
    other = gpu_problem(smi, "2.10.0", "12.1", False, "0,1")
    assert "check CUDA_VISIBLE_DEVICES and the driver" in other
    assert gpu_problem(smi, "2.10.0", "12.8", True) is None  # torch sees it: nothing to say
    assert gpu_problem(smi, "2.10.0", "12.8", False, "-1") is None  # hidden on purpose


class _Before020:
    """SamplingParams as vLLM < 0.20 has it: no logprob_token_ids (msgspec rejects unknown keywords)."""

    def __init__(self, max_tokens: int = 16, logprobs: int | None = None):
        self.max_tokens, self.logprobs = max_tokens, logprobs


class _Release020(_Before020):
    """vLLM 0.20.x: the field exists but without `logprobs` no log-probabilities come back."""

    def __init__(self, max_tokens: int = 16, logprobs: int | None = None, logprob_token_ids=None):
        super().__init__(max_tokens, logprobs)
        self.logprob_token_ids = logprob_token_ids


@pytest.mark.parametrize("cls", [_Before020, _Release020])
def test_old_vllm_is_named_for_expected_scoring(cls):
    msg = vllm_expected_scoring_problem(cls)
    assert msg.startswith("judge.scoring 'expected' on vLLM needs vLLM >= 0.21.0 (SamplingParams.logprob_token_ids)")
    assert "judge.local_backend: transformers" in msg and "locks/cuda13-linux-x86_64.txt" in msg
    assert "\n" not in msg


@pytest.mark.integration
@pytest.mark.vllm
def test_the_installed_vllm_serves_expected_scoring():
    pytest.importorskip("vllm")
    assert vllm_expected_scoring_problem() is None
