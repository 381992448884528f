"""`python -m selftrain status --study FILE`: where every cell of a study stands, and, where Slurm is at hand, which
of its jobs are queued or running.

A cell's run is the newest version made with the cell's params (the one a rerun resumes). Each of its stages is
`done` (marker written and outputs matching their recorded sha256), `running` (the manifest says so and a runner
holds the version's lock; who, since when), `interrupted` (the manifest says running but no process holds the
version: a killed task or node; a rerun resumes it), `failed: <cause>` (the manifest's error), `damaged` (finished
once, outputs changed since) or `not started`. Under Slurm (``squeue`` on PATH) each cell lists the array tasks of
the study's jobs (named ``<study>-generate|cells|infer|finish`` by `selftrain slurm`) that serve it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from selftrain.config import SEED_MAX, ConfigError, RunConfig, dump_config, load_study, resolve_run_config
from selftrain.io import DataError, FileLock, read_json
from selftrain.runs import Run, round_config, version_lock, versions
from selftrain.schema import metrics_or_empty, planned_stages, run_folder, run_state


def stage_states(run: Run) -> dict[str, str]:
    """Each planned stage of a run -> its state, in one line."""
    try:
        recorded = read_json(run.manifest_path).get("stages") or {}
    except (OSError, DataError, AttributeError):
        recorded = {}
    holder = holder_of(run.dir)
    out = {}
    for stage in planned_stages(run.dir):
        entry = recorded.get(stage) or {}
        status = entry.get("status")
        if run.marker(stage).is_file():
            damaged = run.damaged_outputs(stage)
            out[stage] = f"damaged: {', '.join(damaged)[:200]}" if damaged else "done" + _fact(run.dir, stage)
        elif status == "running":
            since = f"started {entry['started']}" if entry.get("started") else "started"
            out[stage] = (f"running ({holder})" if holder is not None else
                          f"interrupted ({since}; no run holds it: a rerun resumes it)")  # fmt: skip
        elif status == "failed":
            cause = str(entry.get("error") or "no cause recorded").strip().splitlines()
            out[stage] = f"failed: {cause[0][:300] if cause else 'no cause recorded'}"
        else:
            out[stage] = "not started"
    return out


def _fact(run_dir: Path, stage: str) -> str:
    """One number a cluster user checks first, from the stage's metrics (empty when none)."""
    m = metrics_or_empty(run_dir, stage)
    if m.get("skipped"):
        return " (skipped)"
    if stage in ("sft", "dpo") and m.get("global_steps") is not None:
        resumed = m.get("resumed_from")
        return f" ({m['global_steps']} steps" + (f", resumed from {Path(resumed).name})" if resumed else ")")
    if stage == "eval" and m.get("avg") is not None:
        return f" (AVG {m['avg']:.4g})"
    return ""


def holder_of(run_dir: Path) -> str | None:
    """Who holds a version's lock ("pid N on HOST since T"), or None when no process does. The probe is a shared
    lock, taken and dropped at once: it writes nothing and a runner that asks meanwhile only waits a moment."""
    lock_file = version_lock(run_dir).path
    if not lock_file.is_file():
        return None
    probe = FileLock(lock_file, shared=True)
    if probe.acquire(wait=False):
        probe.release()
        return None
    return FileLock(lock_file).owner() or "a process holds it"


def squeue_rows(names: list[str]) -> tuple[list[dict[str, str]], str]:
    """This user's queued and running jobs of these names, one row per array task; and a note when squeue could not
    answer (no controller reachable, say)."""
    cmd = ["squeue", "--me", "-h", "-r", f"--name={','.join(names)}", "-o", "%i|%j|%T|%R|%K"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"squeue: {e}"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return [], f"squeue: {last.removeprefix('squeue: ')}"
    keys = ("id", "name", "state", "where", "index")
    return [dict(zip(keys, x.split("|"), strict=True)) for x in p.stdout.splitlines() if x.count("|") == 4], ""


def status_lines(study_path: str, overrides: list[str] | None = None, seeds: list[int] | None = None) -> list[str]:
    """The report `selftrain status` prints."""
    from selftrain.cli.slurm import ARRAYS, tasks

    study, _, path = load_study(study_path)
    bad = [s for s in seeds or [] if not 0 <= s <= SEED_MAX]
    if bad:
        raise ConfigError(f"command line: --seeds {bad}: a seed must be in 0..{SEED_MAX}")
    replicates: list[int | None] = list(seeds if seeds is not None else study.seeds) or [None]
    jobs: dict[tuple[str, str, str], list[str]] = {}
    slurm_note = ""
    if shutil.which("squeue"):
        rows, slurm_note = squeue_rows([f"{study.name}-{a}" for a in ARRAYS])
        table = tasks(study, path)
        for r in rows:
            kind = r["name"].removeprefix(f"{study.name}-")
            try:
                t = table[kind][int(r["index"])]
            except (KeyError, ValueError, IndexError):
                continue
            what = f"{kind}" + (f" {t.stage} shard {t.shard}" if t.shard and kind != "generate" else "")
            what += f" shard {t.shard}" if t.shard and kind == "generate" else ""
            where = f"on {r['where']}" if r["state"] == "RUNNING" else f"({r['where'].strip('()')})"
            jobs.setdefault((t.model, t.method, t.seed), []).append(f"{r['id']} {what} {r['state']} {where}")
    lines = [f"study {study.name} ({path})"]
    for rep in replicates:
        for model in study.models:
            for method in study.methods:
                for point in study.points():
                    cfg = resolve_run_config(model, method, path, overrides, replicate=rep, point=point)
                    lines += _cell_lines(cfg, model)
                    lines += _later_rounds(cfg, model, method, path, overrides, rep, point)
                    seed = "" if rep is None else str(rep)
                    queued = jobs.get((model, method, seed), []) + jobs.get((model, "", seed), [])
                    if point == study.points()[0] and queued:
                        lines.append(f"    slurm: {'; '.join(queued)}")
    if slurm_note:
        lines.append(f"(Slurm jobs not shown: {slurm_note})")
    elif shutil.which("squeue") and not jobs:
        lines.append(f"(no job of this study queued or running: squeue --name={study.name}-*)")
    return lines


def _later_rounds(
    cfg: RunConfig, model: str, method: str, path: Path, overrides: list[str] | None, rep: int | None, point: dict
) -> list[str]:
    """A chain of rounds (study.rounds): rounds 2.. and the closing generation, each as a cell of its own, up to the
    first whose previous round has not finished training (its params need that round's final model)."""
    if cfg.round is None:
        return []
    lines = []
    for index in range(2, cfg.round.of + 2):
        try:
            later = round_config(index, model, method, path, overrides, replicate=rep, point=point)
        except ConfigError:
            name = f"{model}/{run_folder(cfg.method, cfg.replicate, cfg.sweep, index)}"
            lines.append(f"{name}: not started (round {index - 1} has not finished training)")
            break
        lines += _cell_lines(later, model)
    return lines


def _cell_lines(cfg: RunConfig, model: str) -> list[str]:
    index = cfg.round.index if cfg.round is not None else None
    name = f"{model}/{run_folder(cfg.method, cfg.replicate, cfg.sweep, index)}"
    mine = [v for v in versions(cfg) if _params_of(v) == dump_config(cfg)]
    if not mine:
        others = f" ({len(versions(cfg))} version(s) with other params)" if versions(cfg) else ""
        return [f"{name}: not started{others}"]
    run = Run(mine[-1], cfg)
    holder = holder_of(run.dir)
    state = f"running ({holder})" if holder else run_state(run.dir)
    lines = [f"{name}: {state}  [{run.dir}]"]
    lines += [f"    {stage:<9} {text}" for stage, text in stage_states(run).items()]
    return lines


def _params_of(version: Path) -> str | None:
    try:
        return (version / "params.resolved.yaml").read_text()
    except OSError:
        return None
