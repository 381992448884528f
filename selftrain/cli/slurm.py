"""Slurm scripts for a study: `python -m selftrain slurm --study params/studies/poster.yaml [--dry-run]`.

Writes three files into ``results/<study>/slurm/`` (five with sharded inference, below; --dry-run prints them):

- ``generate.sbatch``: an array with one task per (model, seed) running stage 01 only, so every later cell finds
  the generation cache filled instead of generating the same candidates several times at once; where
  `generation.shards` splits the prompt set, one task per shard (`selftrain shard`), merged by the cells' stage 01;
- ``cells.sbatch``: an array with one task per (model, method, seed) cell running every stage of that cell
  (`selftrain run --models M --methods X --seeds S`; done stages are skipped, so a resubmitted array resumes);
- ``submit.sh``: submits the first, then the second with ``--dependency=afterok`` on it. A study with rounds
  (study.rounds R) submits ``cells.sbatch`` once per round (``cells.sbatch <r>`` runs ``--rounds <r>``; the last
  brings the closing generation), each with ``--dependency=aftercorr`` on the round before: task i of round r
  starts when task i of round r-1 (the same cell) succeeded; a failed round leaves its chain's later rounds pending.

Where `judge.answers.shards` or `eval.shards` splits stage 05's answers or 06's predictions, the cells stop after
training, and two more arrays follow: ``infer.sbatch`` with one task per (cell, stage, shard) (`selftrain shard
--stage judge|eval --method X`, the cell's trained model answering its share into the cache) and ``finish.sbatch``
with one task per cell running stages 05 and 06, which merge the shards (producing any that is missing) and score.
They depend on the previous array with ``afterany``: a failed cell's shard task fails fast naming the unfinished
stage, and stage 05/06 produce any shard that is still missing, so one failure does not hold up the grid.

Every script starts the same way: the environment line (``--setup``, e.g. ``source .venv/bin/activate``; by default
the virtualenv that wrote the scripts, if any), ``HF_HUB_OFFLINE=1`` unless the submitting shell set it (nothing is
downloaded on a compute node), and ``OMP_NUM_THREADS`` from the task's CPUs (``SLURM_CPUS_PER_TASK``, else the CPUs
Slurm gave the job on the node), never the whole node's. A launched training stage picks its own port per job
(selftrain.train.launch), so two cells on one node never share one.

``--gpus-per-node`` GPUs per task (0: a CPU cluster, no GPU request); ``--cpus-per-task`` CPUs per task. With
``--nodes N`` above 1 each cell gets N nodes (one task a node): the cell's stages run on the first node, and its
training stages start accelerate on all N through ``srun`` with each node's machine rank and the first node as the main
address (selftrain.train.launch; `training.launch` must name an accelerate config for every trained cell, or the extra
nodes would idle). Generation stays one node per task.

The scripts go into the study's own results folder (``output.results_dir``, ``results/`` by default); each array's
task table is :func:`tasks`, which `selftrain status` reads to name the cell of a queued array task.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from selftrain.config import ConfigError, StudyConfig, load_study, resolve_run_config
from selftrain.io import atomic_write_text, current_umask
from selftrain.paths import output_folder, project_root
from selftrain.schema import STAGES

INFERENCE = ("judge", "eval")  # the stages whose generation can be sharded after training
ARRAYS = ("generate", "cells", "infer", "finish")  # job names: <study>-<array>


@dataclass(frozen=True)
class Task:
    """One array task: the cell it serves (seed "" without study.seeds) and, for shard tasks, stage and shard."""

    model: str
    method: str  # "" for a generation task (any method: generation does not depend on it)
    seed: str
    stage: str = ""
    shard: str = ""

    def label(self) -> str:
        cell = f"{self.model}/{self.method or '*'}" + (f" seed {self.seed}" if self.seed else "")
        return cell + (f" {self.stage}" if self.stage else "") + (f" shard {self.shard}" if self.shard else "")


def tasks(study: StudyConfig, path: Path) -> dict[str, list[Task]]:
    """Each array's tasks in array-index order (the scripts' tables); infer and finish only where stage 05 or 06 is
    sharded."""
    seeds = [str(s) for s in study.seeds] or [""]
    shards = {m: resolve_run_config(m, study.methods[0], study=path).generation.shards for m in study.models}
    gen = [Task(m, "", s, "generate" if shards[m] > 1 else "", str(k) if shards[m] > 1 else "")
           for s in seeds for m in study.models for k in range(shards[m])]  # fmt: skip
    cells = [Task(m, x, s) for s in seeds for m in study.models for x in study.methods]
    infer = []
    for c in cells:
        cfg = resolve_run_config(c.model, c.method, study=path)
        counts = {"judge": cfg.judge.answers.shards, "eval": cfg.eval.shards}
        infer += [Task(c.model, c.method, c.seed, st, str(k)) for st in INFERENCE if st in cfg.stages
                  and counts[st] > 1 for k in range(counts[st])]  # fmt: skip
    out = {"generate": gen, "cells": cells}
    if infer:
        out |= {"infer": infer, "finish": cells}
    return out


def _array(lines: list[str]) -> str:
    return "(\n" + "".join(f"  {shlex.quote(x)}\n" for x in lines) + ")"


def default_setup() -> str:
    """The environment line when --setup is not given: activate the virtualenv running this command, if it is one."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():
        return f"source {shlex.quote(str(activate))}"
    return ""


def scripts_dir(study_path: str) -> Path:
    """<output.results_dir>/<study>/slurm: where the scripts, and the tasks' logs, go."""
    study, _, path = load_study(study_path)
    cfg = resolve_run_config(study.models[0], study.methods[0], study=path)
    return output_folder(cfg.output.results_dir, "output.results_dir", below=False) / study.name / "slurm"


def render(
    study_path: str,
    gpus_per_node: int = 1,
    nodes: int = 1,
    time: str = "24:00:00",
    partition: str | None = None,
    python: str = "python",
    setup: str | None = None,
    cpus_per_task: int | None = None,
) -> dict[str, str]:
    """The scripts' text, keyed by file name. setup: the environment line (None: default_setup())."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {gpus_per_node}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
    if setup is not None and "\n" in setup:
        raise ConfigError("--setup must be one line (join commands with ';' or '&&')")
    study, _, path = load_study(study_path)
    if nodes > 1:
        idle = [f"{m}/{x}" for m in study.models for x in study.methods
                if x != "baseline" and not resolve_run_config(m, x, study=path).training.launch]  # fmt: skip
        if idle:
            raise ConfigError(
                f"--nodes {nodes}: cells {', '.join(idle[:5])} train in one process (training.launch is not set); "
                "set training.launch (e.g. ddp, fsdp, zero3) in the study so their training spans the nodes"
            )
    table = tasks(study, path)
    out = scripts_dir(study_path)
    root = project_root()
    logs = out.relative_to(root) if out.is_relative_to(root) else out
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    setup = default_setup() if setup is None else setup.strip()
    resources = [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    resources += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    resources.append(f"--time={time}")
    log_dir = f'"{logs}"' if any(c.isspace() for c in str(logs)) else str(logs)  # #SBATCH lines: sbatch's quotes

    def head(name: str, count: int, n_nodes: int = 1) -> list[str]:
        return [
            "#!/bin/bash",
            f"#SBATCH --nodes={n_nodes} --ntasks-per-node=1 {' '.join(resources)}",
            f"#SBATCH --job-name={study.name}-{name} --array=0-{count - 1}",
            *([f"#SBATCH --partition={partition}"] if partition else []),
            f"#SBATCH --output={log_dir}/%x-%A_%a.out",
            "set -eo pipefail",
            f"cd {shlex.quote(str(root))}",
            setup + "  # the environment (--setup)" if setup else "# no --setup: the environment sbatch exported",
            "set -u",
            "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # nothing is downloaded on a compute node",
            "# threads: the task's CPUs, not the node's (launched training divides them among its processes)",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}",
        ]

    def columns(ts: list[Task], *names: str) -> list[str]:
        return [f"{n}s={_array([getattr(t, n) for t in ts])}" for n in names]

    seed_arg = '${seed:+--seeds "$seed"}'
    # A study with rounds: the generation array fills round 1's cache (M0's); the cells run one array per round, each
    # task after the same task of the round before (aftercorr), so a chain waits only for its own previous round.
    chain = study.rounds > 1
    first_round = " --rounds 1" if chain else ""
    round_arg = ' --rounds "$round"' if chain else ""
    pick = 'i=$SLURM_ARRAY_TASK_ID; model="${models[$i]}"; method="${methods[$i]}"; seed="${seeds[$i]}"'
    gen = table["generate"]
    generate = [
        *head("generate", len(gen)),
        *columns(gen, "model", "seed", "shard"),
        'i=$SLURM_ARRAY_TASK_ID; model="${models[$i]}"; seed="${seeds[$i]}"; shard="${shards[$i]}"',
        'if [ -n "$shard" ]; then',
        f"  {python} -m selftrain shard --study {shlex.quote(str(rel))} --model \"$model\" --shard \"$shard\" "
        '${seed:+--seed "$seed"}',
        "else",
        f"  {python} -m selftrain run --study {shlex.quote(str(rel))} --models \"$model\" "
        f"--methods {shlex.quote(study.methods[0])} --stages generate {seed_arg}{first_round}",
        "fi",
    ]  # fmt: skip
    infer = table.get("infer", [])
    if chain and infer:
        raise ConfigError(
            f"{path}: study.rounds with sharded judge / eval (judge.answers.shards, eval.shards) has no script yet: "
            "run the rounds with unsharded stages 05/06"
        )
    until = f" --stages {' '.join(s for s in STAGES if s not in INFERENCE)}" if infer else ""
    run_cell = f'{python} -m selftrain run --study {shlex.quote(str(rel))} --models "$model" --methods "$method" '
    cells = table["cells"]
    run = [*head("cells", len(cells), nodes), *columns(cells, "model", "method", "seed"), pick,
           *(['round="${1:?usage: sbatch cells.sbatch <round>}"'] if chain else []),
           f"{run_cell}{seed_arg}{until}{round_arg}"]  # fmt: skip
    slurm_dir = shlex.quote(str(logs))
    # A task that fails its afterok dependency never runs: --kill-on-invalid-dep takes the waiting array off the
    # queue instead of leaving it pending forever.
    submit = [
        "#!/bin/bash",
        "set -euo pipefail",
        f"cd {shlex.quote(str(root))}",
        f"gen=$(sbatch --parsable {slurm_dir}/generate.sbatch)",
        f'cells=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:"$gen" {slurm_dir}/cells.sbatch'
        f"{' 1' if chain else ''})",
    ]
    submit += [f'cells=$(sbatch --parsable --dependency=aftercorr:"$cells" {slurm_dir}/'
               f"cells.sbatch {r})" for r in range(2, study.rounds + 1)]  # fmt: skip
    files = {"generate.sbatch": generate, "cells.sbatch": run}
    if infer:
        files["infer.sbatch"] = [
            *head("infer", len(infer)),
            *columns(infer, "model", "method", "seed", "stage", "shard"),
            pick,
            f"{python} -m selftrain shard --study {shlex.quote(str(rel))} --model \"$model\" --method \"$method\" "
            '--stage "${stages[$i]}" --shard "${shards[$i]}" ${seed:+--seed "$seed"}',
        ]  # fmt: skip
        files["finish.sbatch"] = [
            *head("finish", len(cells)), *columns(cells, "model", "method", "seed"), pick,
            f"{run_cell}{seed_arg} --stages {' '.join(INFERENCE)}",
        ]  # fmt: skip
        submit += [
            f'inf=$(sbatch --parsable --dependency=afterany:"$cells" {slurm_dir}/infer.sbatch)',
            f'fin=$(sbatch --parsable --dependency=afterany:"$inf" {slurm_dir}/finish.sbatch)',
            'echo "generate job $gen, cells job $cells, infer job $inf, finish job $fin"',
        ]
    else:
        submit.append('echo "generate job $gen, cells job $cells"')
    submit.append(f'echo "status: python -m selftrain status --study {shlex.quote(str(rel))}"')
    files["submit.sh"] = submit
    return {name: "\n".join(lines) + "\n" for name, lines in files.items()}


def write(study_path: str, files: dict[str, str]) -> Path:
    """Write the scripts into <output.results_dir>/<study>/slurm/ (scripts_dir), each atomically with the umask's
    permissions (submit.sh executable)."""
    out = scripts_dir(study_path)
    for name, text in files.items():
        atomic_write_text(out / name, text)
        if name.endswith(".sh"):
            os.chmod(out / name, 0o777 & ~current_umask())
    return out
