"""Training through `accelerate launch` (training.launch) on the tiny model, CPU only: two DDP processes over gloo
give the loss curve and final weights of one in-kernel process (same global batch), only the notebook's process
writes the run folder, a failing rank fails the stage with that rank's error, a killed kernel takes every rank
down and the stage then resumes from the last complete checkpoint; the launch command for one and two nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from selftrain import generate, select, train
from selftrain.config import ConfigError, resolve_run_config
from selftrain.runs import Run, create_run
from selftrain.train import launch

pytestmark = pytest.mark.timeout(600)

# 5 examples, drop_last: 2 steps an epoch at a global batch of 2, 3 epochs.
SFT = ["training.sft.num_train_epochs=3", "training.sft.dataloader_drop_last=true", "training.sft.logging_steps=1"]
DDP = ["training.launch=ddp", "training.launch_processes=2", "training.sft.per_device_train_batch_size=1"]


def _selected(overrides: list[str], extra: list[str]) -> Run:
    run = create_run(resolve_run_config("tiny", "central", overrides=[*overrides, *SFT, *extra]))
    generate.run(run, progress=False)
    select.run(run, progress=False)
    return run


def _losses(run: Run) -> list[float]:
    return [h["loss"] for h in json.loads((run.metrics_dir / "sft_log.json").read_text()) if "loss" in h]


def _files(run: Run) -> set[str]:
    return {str(p.relative_to(run.dir)) for p in run.dir.rglob("*") if p.is_file()}


def test_ddp_two_processes_match_one_in_kernel(tiny_overrides: list[str], tiny_model: Path) -> None:
    one = _selected(tiny_overrides, ["training.sft.per_device_train_batch_size=2"])
    train.train_stage(one, "sft", progress=False)
    two = _selected(tiny_overrides, DDP)
    train.train_stage(two, "sft", progress=False)

    m = json.loads((two.metrics_dir / "sft.json").read_text())
    assert m["processes"] == 2 and m["global_steps"] == 6 and two.is_done("sft")
    assert two.manifest()["stages"]["sft"]["numerics"]["launch"] == "ddp"
    # Tolerance: the same loss at every step within 1e-3 relative (float sums over two processes differ in
    # order), and final weights whose distance from the in-kernel ones is under 5% of the distance training moved
    # them (all weights as one vector; observed 1.5%: Adam magnifies the order-of-summation noise of weights whose
    # gradients are near zero, so single elements differ more).
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=1e-3), (a, b)
    w0 = load_file(str(tiny_model / "model.safetensors"))
    w1 = load_file(str(one.final_model() / "model.safetensors"))
    w2 = load_file(str(two.final_model() / "model.safetensors"))
    moved = np.sqrt(sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1))
    diff = np.sqrt(sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1))
    assert set(w1) == set(w2) == set(w0) and moved > 0.1 and diff < 0.05 * moved, (diff, moved)
    # The run folder holds what an in-kernel run writes, plus the launch log; the ranks' hand-back lies beside
    # the checkpoints and holds rank 0's result only (no rank failed).
    assert _files(two) - _files(one) == {"logs/sft-launch.log"}
    launch_dir = train.checkpoints_dir(two, "sft") / "launch"
    assert sorted(p.name for p in launch_dir.iterdir()) == ["result.json"]
    assert "accelerate.commands.launch" in (two.dir / "logs" / "sft-launch.log").read_text()


def test_a_failing_rank_fails_the_stage_with_its_error(tiny_overrides: list[str]) -> None:
    run = _selected(tiny_overrides, [*DDP, "training.sft_attn_implementation=no_such_kernel"])
    # The first rank to fail is reported (accelerate's agent stops the others as soon as one fails).
    with pytest.raises(launch.LaunchError, match=r"exited with 1: rank [01]: ValueError: .*no_such_kernel") as e:
        train.train_stage(run, "sft", progress=False)
    assert "sft-launch.log" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not run.is_done("sft") and run.manifest()["stages"]["sft"]["status"] == "failed"
    assert "LaunchError" in run.manifest()["stages"]["sft"]["error"]


def _ranks_of(run_dir: Path) -> list[int]:
    """PIDs of processes whose command line names this run folder (the launched ranks and their agent)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmd and "--worker" in cmd:
                out.append(int(proc.name))
    return out


def test_killed_kernel_takes_the_ranks_down_and_the_stage_resumes(tiny_overrides: list[str], tmp_path: Path) -> None:
    extra = [*DDP, "training.sft.num_train_epochs=12", "training.sft.save_steps=2"]
    run = _selected(tiny_overrides, extra)
    ov = [*tiny_overrides, *SFT, *extra]
    script = tmp_path / "kernel.py"
    script.write_text(
        textwrap.dedent(f"""
        from selftrain import train
        from selftrain.config import resolve_run_config
        from selftrain.runs import create_run
        run = create_run(resolve_run_config("tiny", "central", overrides={ov!r}))
        assert str(run.dir) == {str(run.dir)!r}
        train.train_stage(run, "sft", progress=False)
    """)
    )
    kernel = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1])
    trainer_dir = train.checkpoints_dir(run, "sft") / "trainer"
    deadline = time.time() + 300
    while not list(trainer_dir.glob("checkpoint-*/_COMPLETE")):
        assert kernel.poll() is None, "the stage ended before a checkpoint was written"
        assert time.time() < deadline, "no complete checkpoint within 300 s"
        time.sleep(0.2)
    kernel.send_signal(signal.SIGKILL)  # a dead kernel: no exception handler runs in it
    kernel.wait()
    deadline = time.time() + 60
    while _ranks_of(run.dir) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ranks_of(run.dir), "ranks kept running after their kernel died"
    assert not run.is_done("sft")
    done = sorted(int(p.parent.name.split("-")[1]) for p in trainer_dir.glob("checkpoint-*/_COMPLETE"))

    train.train_stage(run, "sft", progress=False)  # the same run folder, resumed in multi-process mode
    m = json.loads((run.metrics_dir / "sft.json").read_text())
    assert m["global_steps"] == 24 and m["processes"] == 2 and run.is_done("sft")
    assert m["resumed_from"] and int(m["resumed_from"].rsplit("-", 1)[1]) >= done[-1]
    assert not trainer_dir.exists() and (train.checkpoints_dir(run, "sft") / "final" / "_SUCCESS").is_file()


def test_launch_commands_for_one_and_two_nodes(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    cfg = resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "training.launch=fsdp",
                                                            "training.launch_processes=4"])  # fmt: skip
    argv = launch.command(cfg, tmp_path / "run", "dpo", tmp_path / "start", tmp_path / "r.json", python="py")
    # one machine: a port free here now (two cells launched side by side on one node never share 29500 any more)
    port = int(argv[argv.index("--main_process_port") + 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert argv[:4] == ["py", "-m", "accelerate.commands.launch", "--config_file"]
    assert argv[4].endswith("params/accelerate/fsdp.yaml") and argv[argv.index("--num_processes") + 1] == "4"
    assert argv[-6:] == ["--worker", str(tmp_path / "run"), "dpo", str(tmp_path / "start"), str(tmp_path / "r.json")][
        -6:
    ] or argv[-5:] == ["--worker", str(tmp_path / "run"), "dpo", str(tmp_path / "start"), str(tmp_path / "r.json")]
    two = cfg.model_copy(update={"training": cfg.training.model_copy(update={"launch_nodes": 2})})
    argv = launch.command(two, tmp_path / "run", "sft", tmp_path / "start", tmp_path / "r.json", python="py")
    assert argv[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    script = argv[-1]
    assert "--num_processes 8" in script and "--num_machines 2" in script and '--machine_rank "$SLURM_NODEID"' in script
    assert '--main_process_ip "$MAIN"' in script and "--main_process_port 23457" in script  # 20000 + job id % 10000
    fixed = two.model_copy(update={"training": two.training.model_copy(update={"launch_port": 29600})})
    assert "--main_process_port 29600" in launch.command(fixed, tmp_path, "sft", tmp_path, tmp_path / "r")[-1]
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    # The script's own variables: the main address is the allocation's first host.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node07\\nnode08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    (fake / "py").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "py").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "x"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout
    assert "--machine_rank 1 " in out and "--main_process_ip node07 " in out


def test_bad_launch_values_are_named(tiny_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"training.launch 'nosuch' is neither a preset \(ddp, fsdp, single, zero3\)"):
        resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "training.launch=nosuch"])
    with pytest.raises(ConfigError, match="launch_processes"):
        resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "training.launch_processes=0"])


def test_sharded_presets_are_refused_without_a_gpu(tiny_overrides: list[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for preset in ("fsdp", "zero3"):
        run = _selected(tiny_overrides, [f"training.launch={preset}", "training.launch_processes=2"])
        with pytest.raises(launch.LaunchError, match=f"training.launch {preset}: .* shards over GPUs"):
            train.train_stage(run, "sft", progress=False)
    run = _selected(tiny_overrides, ["training.launch=fsdp", "training.use_lora=true"])
    with pytest.raises(launch.LaunchError, match=r"training.launch fsdp \(FSDP\) with training.use_lora"):
        train.train_stage(run, "sft", progress=False)


@pytest.mark.gpu
def test_fsdp_on_a_gpu_saves_a_whole_model(tiny_overrides: list[str], tiny_model: Path) -> None:
    """FSDP through accelerate (one process per visible GPU): the stage records the sharding, and the gathered
    final model has every weight of the base model, with the in-kernel run's loss curve."""
    one = _selected(tiny_overrides, ["training.sft.per_device_train_batch_size=2"])
    train.train_stage(one, "sft", progress=False)
    run = _selected(tiny_overrides, ["training.launch=fsdp", "training.launch_processes=1",
                                     "training.sft.per_device_train_batch_size=2"])  # fmt: skip
    train.train_stage(run, "sft", progress=False)
    assert run.manifest()["stages"]["sft"]["numerics"]["sharding"] == "fsdp"
    w = load_file(str(run.final_model() / "model.safetensors"))
    assert set(w) == set(load_file(str(tiny_model / "model.safetensors")))
    assert np.allclose(_losses(one), _losses(run), rtol=2e-2)


def test_vllm_tensor_parallel_size_reaches_the_engine_and_the_cache_key(tiny_overrides: list[str]) -> None:
    from selftrain.generate import generation_key
    from selftrain.inference import vllm_engine_args
    from selftrain.models import resolve_model_path

    cfg = resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "model.tensor_parallel_size=4"])
    args = vllm_engine_args(Path("/m"), cfg.model, 7, on_cpu=False)
    assert args["tensor_parallel_size"] == 4 and args["seed"] == 7 and not args["enforce_eager"]
    with pytest.raises(ValueError, match="tensor_parallel_size 4: .* this machine has none"):
        vllm_engine_args(Path("/m"), cfg.model, 7, on_cpu=True)
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}]
    folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
    key = {(b, tp): generation_key(folder, prompts, cfg.generation, b, 512, tp) for b in ("vllm", "transformers")
           for tp in (1, 4)}  # fmt: skip
    assert key["vllm", 1] != key["vllm", 4] and key["transformers", 1] == key["transformers", 4]


def test_ranks_share_the_tasks_cpus(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads per rank: the task's CPUs (the script's OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else this process's
    CPUs) divided among the machine's processes; before issue 28 each rank took the whole node's CPU count / ranks."""
    cfg = resolve_run_config("tiny", "central", overrides=[*tiny_overrides, *DDP])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert launch.rank_threads(cfg) == 3 and launch._env(cfg)["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert launch._env(cfg)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch._env(cfg)["OMP_NUM_THREADS"] == "1"  # never 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert launch.rank_threads(cfg) == max(1, len(os.sched_getaffinity(0)) // 2)
