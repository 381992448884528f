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

``--gpus-per-node`` GPUs per task. With ``--nodes N`` above 1 each cell gets N nodes (one task a node): the cell's
stages run on the first node, and its training stages start accelerate on all N through ``srun`` with each node's
machine rank and the first node as the main address (selftrain.train.launch; `training.launch` must name an accelerate
config for every trained cell, or the extra nodes would idle). Generation stays one node per task.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from selftrain.config import ConfigError, load_study, resolve_run_config
from selftrain.io import atomic_write_text, current_umask
from selftrain.paths import project_root, study_folder
from selftrain.schema import STAGES

INFERENCE = ("judge", "eval")  # the stages whose generation can be sharded after training


def _array(lines: list[str]) -> str:
    return "(\n" + "".join(f"  {shlex.quote(x)}\n" for x in lines) + ")"


def render(
    study_path: str,
    gpus_per_node: int = 1,
    nodes: int = 1,
    time: str = "24:00:00",
    partition: str | None = None,
    python: str = "python",
) -> dict[str, str]:
    """The three files' text, keyed by file name."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    study, _, path = load_study(study_path)
    if nodes > 1:
        idle = [f"{m}/{x}" for m in study.models for x in study.methods
                if x != "baseline" and not resolve_run_config(m, x, study=path).training.launch]  # fmt: skip
        if idle:
            raise ConfigError(
                f"--nodes {nodes}: cells {', '.join(idle[:5])} train in one process (training.launch is not set); "
                "set training.launch (e.g. ddp, fsdp, zero3) in the study so their training spans the nodes"
            )
    seeds = [str(s) for s in study.seeds] or [""]
    rel = path.relative_to(project_root()) if path.is_relative_to(project_root()) else path
    head = [
        "#!/bin/bash",
        f"#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node={gpus_per_node} --time={time}",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        f"#SBATCH --output=results/{study.name}/slurm/%x-%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(project_root()))}",
    ]
    # One task per (model, seed), or per (model, seed, shard) where generation.shards splits the prompt set.
    shards = {m: resolve_run_config(m, study.methods[0], study=path).generation.shards for m in study.models}
    gen_cells = [(m, s, str(k) if shards[m] > 1 else "") for s in seeds for m in study.models for k in range(shards[m])]
    cells = [(m, x, s) for s in seeds for m in study.models for x in study.methods]
    seed_arg = '${seed:+--seeds "$seed"}'
    # A study with rounds: the generation array fills round 1's cache (M0's); the cells run one array per round, each
    # task after the same task of the round before (aftercorr), so a chain waits only for its own previous round.
    chain = study.rounds > 1
    first_round = " --rounds 1" if chain else ""
    round_arg = ' --rounds "$round"' if chain else ""
    generate = [
        *head[:2], f"#SBATCH --job-name={study.name}-generate --array=0-{len(gen_cells) - 1}", *head[2:],
        f"models={_array([m for m, _, _ in gen_cells])}",
        f"seeds={_array([s for _, s, _ in gen_cells])}",
        f"shards={_array([k for _, _, k in gen_cells])}",
        'i=$SLURM_ARRAY_TASK_ID; model="${models[$i]}"; seed="${seeds[$i]}"; shard="${shards[$i]}"',
        'if [ -n "$shard" ]; then',
        f"  {python} -m selftrain shard --study {shlex.quote(str(rel))} --model \"$model\" --shard \"$shard\" "
        '${seed:+--seed "$seed"}',
        "else",
        f"  {python} -m selftrain run --study {shlex.quote(str(rel))} --models \"$model\" "
        f"--methods {shlex.quote(study.methods[0])} --stages generate {seed_arg}{first_round}",
        "fi",
    ]  # fmt: skip
    # (model, method, seed, stage, shard) for every sharded inference stage of every cell
    infer = []
    for m, x, sd in cells:
        cfg = resolve_run_config(m, x, study=path)
        counts = {"judge": cfg.judge.answers.shards, "eval": cfg.eval.shards}
        infer += [(m, x, sd, st, str(k)) for st in INFERENCE if st in cfg.stages and counts[st] > 1
                  for k in range(counts[st])]  # fmt: skip
    if chain and infer:
        raise ConfigError(
            f"{path}: study.rounds with sharded judge / eval (judge.answers.shards, eval.shards) has no script yet: "
            "run the rounds with unsharded stages 05/06"
        )
    cell_head = head[1].replace("--nodes=1", f"--nodes={nodes}")
    until = f" --stages {' '.join(s for s in STAGES if s not in INFERENCE)}" if infer else ""
    run_cell = f'{python} -m selftrain run --study {shlex.quote(str(rel))} --models "$model" --methods "$method" '
    cell_table = [
        f"models={_array([m for m, _, _ in cells])}",
        f"methods={_array([x for _, x, _ in cells])}",
        f"seeds={_array([s for _, _, s in cells])}",
        'i=$SLURM_ARRAY_TASK_ID; model="${models[$i]}"; method="${methods[$i]}"; seed="${seeds[$i]}"',
    ]
    run = [
        head[0], cell_head, f"#SBATCH --job-name={study.name}-cells --array=0-{len(cells) - 1}", *head[2:],
        *cell_table, *(['round="${1:?usage: sbatch cells.sbatch <round>}"'] if chain else []),
        f"{run_cell}{seed_arg}{until}{round_arg}",
    ]  # fmt: skip
    submit = [
        "#!/bin/bash",
        "set -euo pipefail",
        f"cd {shlex.quote(str(project_root()))}",
        f"mkdir -p results/{study.name}/slurm",
        f"gen=$(sbatch --parsable results/{study.name}/slurm/generate.sbatch)",
        f'{"cells=$(sbatch --parsable" if infer or chain else "sbatch"} --dependency=afterok:"$gen" '
        f"results/{study.name}/slurm/cells.sbatch{' 1)' if chain else ')' if infer else ''}",
    ]
    for r in range(2, study.rounds + 1):
        again, close = ("cells=$(sbatch --parsable", ")") if r < study.rounds else ("sbatch", "")
        submit.append(f'{again} --dependency=aftercorr:"$cells" results/{study.name}/slurm/cells.sbatch {r}{close}')
    files = {"generate.sbatch": generate, "cells.sbatch": run}
    if infer:
        files["infer.sbatch"] = [
            *head[:2], f"#SBATCH --job-name={study.name}-infer --array=0-{len(infer) - 1}", *head[2:],
            f"models={_array([t[0] for t in infer])}",
            f"methods={_array([t[1] for t in infer])}",
            f"seeds={_array([t[2] for t in infer])}",
            f"stages={_array([t[3] for t in infer])}",
            f"shards={_array([t[4] for t in infer])}",
            'i=$SLURM_ARRAY_TASK_ID; model="${models[$i]}"; method="${methods[$i]}"; seed="${seeds[$i]}"',
            f"{python} -m selftrain shard --study {shlex.quote(str(rel))} --model \"$model\" --method \"$method\" "
            '--stage "${stages[$i]}" --shard "${shards[$i]}" ${seed:+--seed "$seed"}',
        ]  # fmt: skip
        files["finish.sbatch"] = [
            *head[:2], f"#SBATCH --job-name={study.name}-finish --array=0-{len(cells) - 1}", *head[2:],
            *cell_table, f"{run_cell}{seed_arg} --stages {' '.join(INFERENCE)}",
        ]  # fmt: skip
        submit += [
            f'inf=$(sbatch --parsable --dependency=afterany:"$cells" results/{study.name}/slurm/infer.sbatch)',
            f'sbatch --dependency=afterany:"$inf" results/{study.name}/slurm/finish.sbatch',
        ]
    files["submit.sh"] = submit
    return {name: "\n".join(lines) + "\n" for name, lines in files.items()}


def write(study_path: str, files: dict[str, str], results_dir: str = "results") -> Path:
    """Write the scripts into <results_dir>/<study>/slurm/ (a folder where results may be written), each atomically
    with the umask's permissions (submit.sh executable)."""
    study, _, _ = load_study(study_path)
    out = study_folder(results_dir, study.name) / "slurm"
    for name, text in files.items():
        atomic_write_text(out / name, text)
        if name.endswith(".sh"):
            os.chmod(out / name, 0o777 & ~current_umask())
    return out
