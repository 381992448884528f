"""Training through `accelerate launch` (training.launch): stages 03/04 start their trainer in a child process
group, stream its progress into the notebook and read back what rank 0 reports.

The child runs ``python -m accelerate.commands.launch --config_file <preset> ... -m selftrain.train --worker
<run_dir> <kind> <start> <result.json>``; every rank builds the same trainer (`train.train_in_process`), rank 0 saves
the final model whole and writes ``result.json``; a rank that fails writes ``error-rank<N>.txt``. Both live
beside the trainer's checkpoints (``<checkpoints>/.../<stage>/launch/``), never in the run folder: the notebook's
process alone writes the run folder (metrics, log, figures, manifest), from that result. The child's whole
output goes to the run's ``logs/<stage>-launch.log``.

More than one machine (`training.launch_nodes`, or SLURM_JOB_NUM_NODES inside an allocation): the child is
``srun --nodes N --ntasks-per-node 1`` over the allocation, each node's accelerate given its machine rank
(SLURM_NODEID) and the first node of the allocation as the main address.

Each launch has a port of its own (`main_port`) and each rank its share of the task's CPUs (`rank_threads`), so two
cells launched side by side on one node neither collide on a port nor oversubscribe the cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from selftrain.config import RunConfig, accelerate_config
from selftrain.io import atomic_write_text, read_json
from selftrain.paths import project_root
from selftrain.runs import Run

WORKER = "selftrain.train"
# What of the child's output the notebook shows when not verbose: progress bars and the Trainer's loss lines.
_SHOWN = re.compile(r"\d+%\||^\{'(loss|train_|eval_)")


class LaunchError(RuntimeError):
    """The launched training failed; the message names the rank and its error, or the log to read."""


def processes(cfg: RunConfig) -> int:
    """Processes per machine: training.launch_processes, else one per visible GPU, else 1."""
    if cfg.training.launch_processes:
        return cfg.training.launch_processes
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except ImportError:
        return 1


def nodes(cfg: RunConfig) -> int:
    if cfg.training.launch_nodes:
        return cfg.training.launch_nodes
    return int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)


PORT_BASE, PORT_SPAN = 20000, 10000  # job-derived ports: below Linux's ephemeral range (32768 and up)


def main_port(cfg: RunConfig, n_nodes: int) -> int:
    """The launch's main process port: training.launch_port if set; else, across machines, one every node of the
    Slurm job derives alike from its job id (array tasks have ids of their own); else a port free here now."""
    if cfg.training.launch_port:
        return cfg.training.launch_port
    job = os.environ.get("SLURM_JOB_ID", "")
    if n_nodes > 1 and job.isdigit():
        return PORT_BASE + int(job) % PORT_SPAN
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def task_cpus() -> int:
    """The CPUs this task may use: OMP_NUM_THREADS where the caller set the budget (the sbatch scripts do), else
    Slurm's CPUs per task, else the CPUs this process may run on."""
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


def rank_threads(cfg: RunConfig) -> int:
    """Threads per training process on a machine: the task's CPUs shared among its processes (no oversubscription)."""
    return max(1, task_cpus() // processes(cfg))


def distributed_type(config: Path) -> str:
    """The `distributed_type` of an accelerate config file (NO, MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    import yaml

    return str((yaml.safe_load(config.read_text()) or {}).get("distributed_type", "NO")).upper()


def command(
    cfg: RunConfig, run_dir: Path, kind: str, start: Path, result: Path, python: str = sys.executable
) -> list[str]:
    """The argv that starts the training processes (for one machine or, through srun, for several)."""
    config = accelerate_config(cfg.training.launch or "single")
    per_node, n_nodes = processes(cfg), nodes(cfg)
    acc = [python, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(per_node * n_nodes)]  # fmt: skip
    if per_node * n_nodes > 1 and distributed_type(config) == "NO":
        acc.append("--multi_gpu")  # a one-process config asked for several processes: plain DDP
    worker = ["-m", WORKER, "--worker", str(run_dir), kind, str(start), str(result)]
    port = str(main_port(cfg, n_nodes))
    if n_nodes == 1:
        return [*acc, "--num_machines", "1", "--main_process_port", port, *worker]
    multi = [*acc, "--num_machines", str(n_nodes), "--machine_rank", '"$SLURM_NODEID"',
             "--main_process_ip", '"$MAIN"', "--main_process_port", port, *worker]  # fmt: skip
    line = " ".join(a if a.startswith('"$') else shlex.quote(a) for a in multi)
    script = f'MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1); exec {line}'
    return ["srun", f"--nodes={n_nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", script]


PARENT_ENV = "SELFTRAIN_LAUNCH_PARENT"  # "<host> <pid>" of the process that launched the stage


def watch_parent(interval_s: float = 2.0) -> None:
    """In each rank: exit when the process that launched the stage is gone (a killed kernel), so no rank goes on
    training into the checkpoints of a run that may be resumed; accelerate's agent then ends too."""
    import threading
    import time

    host, _, pid_text = os.environ.get(PARENT_ENV, "").partition(" ")
    pid = int(pid_text or 0)
    if pid <= 0 or host != socket.gethostname():
        return  # ranks on the other nodes of a multi-node launch: srun ends them with the step

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass

    threading.Thread(target=loop, daemon=True, name="selftrain-parent-watch").start()


def _env(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[PARENT_ENV] = f"{socket.gethostname()} {os.getpid()}"
    env["OMP_NUM_THREADS"] = str(rank_threads(cfg))  # the task's CPUs shared among its ranks
    src = str(project_root())
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _errors(folder: Path) -> list[str]:
    """Each failed rank's one-line error, in rank order."""
    found = []
    for f in folder.glob("error-rank*.txt"):
        lines = f.read_text(errors="replace").strip().splitlines()
        found.append((int(f.stem.removeprefix("error-rank") or 0), lines[0] if lines else "(empty)"))
    return [f"rank {rank}: {line}" for rank, line in sorted(found)]


def _tail(log: Path, chars: int = 800) -> str:
    """The end of the child's output on one line (progress bars' carriage returns as line breaks)."""
    if not log.is_file():
        return ""
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    return " | ".join(x.strip() for x in lines if x.strip())[-chars:]


SHARDED = ("FSDP", "DEEPSPEED")


def check_device(cfg: RunConfig) -> None:
    """FSDP and DeepSpeed shard over GPUs: on a machine without one accelerate would fall back to plain CPU data
    parallel without saying so; refuse instead. LoRA with them is refused too (the final model is saved merged)."""
    kind = distributed_type(accelerate_config(cfg.training.launch or "single"))
    if kind in SHARDED and cfg.training.use_lora:
        # The final model is saved merged; a sharded run's save_model writes the adapter alone.
        raise LaunchError(f"training.launch {cfg.training.launch} ({kind}) with training.use_lora is not supported: "
                          "use ddp (or single) for LoRA, or train all weights")  # fmt: skip
    if kind in SHARDED:
        import torch

        if not torch.cuda.is_available():
            raise LaunchError(
                f"training.launch {cfg.training.launch}: {kind} shards over GPUs and this machine has none; "
                "use training.launch=ddp with training.launch_processes for data parallel on CPUs"
            )


def launch(run: Run, kind: str, start: Path, base: Path, progress: bool = True) -> dict[str, Any]:
    """Train `kind` for the run through accelerate; return rank 0's result (see train.train_in_process)."""
    cfg = run.config
    check_device(cfg)
    folder = base / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    for stale in [result, *folder.glob("error-rank*.txt")]:
        stale.unlink(missing_ok=True)
    argv = command(cfg, run.dir, kind, start, result)
    log = run.dir / "logs" / f"{kind}-launch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        sink.write(("$ " + " ".join(shlex.quote(a) for a in argv) + "\n").encode())
        sink.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(cfg),
                                cwd=project_root(), start_new_session=True)  # fmt: skip
        try:
            _pump(proc, sink, progress, run.verbose)
            rc = proc.wait()
        except BaseException:
            stop(proc)  # an interrupted cell (or a dying kernel's exception) takes every rank down with it
            raise
    if rc != 0 or not result.is_file():
        errs = _errors(folder)
        why = "; ".join(errs) if errs else f"no rank reported an error; the log ends: {_tail(log)}"
        raise LaunchError(f"{kind}: accelerate launch exited with {rc}: {why} (full output: {log})")
    return read_json(result)


def _pump(proc: subprocess.Popen, sink: Any, show: bool, verbose: bool) -> None:
    """Copy the child's output into the log as it comes, and the progress part of it to the cell."""
    pending = ""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(8192):  # type: ignore[attr-defined]
        sink.write(chunk)
        sink.flush()
        if not show:
            continue
        pending += chunk.decode(errors="replace")
        parts = re.split(r"(\r|\n)", pending)
        pending = parts.pop()  # an unfinished line waits for the next chunk
        for text, end in zip(parts[::2], parts[1::2], strict=True):
            if verbose or _SHOWN.search(text):
                sys.stdout.write(text + end)
        sys.stdout.flush()


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate the child's whole process group (accelerate, torchrun and every rank), then kill it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def worker_result(path: Path, result: dict[str, Any]) -> None:
    """Rank 0's result, written atomically (the parent treats a missing file as a failed launch). Not write_json:
    a NaN loss must come back as NaN, as the in-kernel path hands it on, not as null."""
    atomic_write_text(path, json.dumps(result, default=str))
