"""Command line: `python -m selftrain <command>`, one small function per subcommand and one table that maps each
subcommand to it. Every command's expected failure (bad params, a missing file, a refused path) is one line on
stderr and exit status 2; a failed cell of `run` is exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from selftrain.config import ConfigError, validate_params_file
from selftrain.io import DataError
from selftrain.models import ModelNotAvailable
from selftrain.paths import UnsafePath, project_root
from selftrain.paths import study_dir as study_dir_of
from selftrain.runs import StageNotDone

EXPECTED = (ConfigError, FileNotFoundError, DataError, OSError, StageNotDone, ModelNotAvailable, UnsafePath)


def parser() -> argparse.ArgumentParser:
    """Every subcommand and its arguments."""
    ap = argparse.ArgumentParser(prog="python -m selftrain", description="selftrain: self-training studies of LLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a study's grid of model x method through the stage notebooks")
    r.add_argument("--study", required=True, help="study YAML, e.g. params/studies/demo.yaml")
    r.add_argument("--models", nargs="+", help="only these models of the study")
    r.add_argument("--methods", nargs="+", help="only these methods of the study")
    r.add_argument("--stages", nargs="+", help="only these stages (done stages are skipped anyway)")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set generation.n=2 (repeatable)",
    )
    r.add_argument(
        "--seeds", nargs="+", type=int, help="replicate seeds to run (default: the study's `seeds`, else its own)"
    )
    r.add_argument(
        "--rounds",
        nargs="+",
        type=int,
        help="a study with rounds: only these rounds of each chain (earlier ones must be done; the last brings the "
        "closing generation); default: all, in order",
    )
    r.add_argument("--new-version", action="store_true", help="start a new run version even if one matches")
    r.add_argument(
        "--verbose", action="store_true", help="echo the notebooks' output and libraries' logs (else: the run's logs/)"
    )
    r.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # the default now; accepted, does nothing
    sh = sub.add_parser(
        "shard",
        help="fill one shard of stage 01's candidates, 05's answers or 06's predictions in the cache (an array "
        "task, a GPU); the stage merges them",
    )
    sh.add_argument("--study", required=True, help="study YAML, e.g. params/studies/poster.yaml")
    sh.add_argument("--model", required=True, help="one model of the study")
    sh.add_argument(
        "--stage", choices=SHARDED, default="generate",
        help="generate (generation.shards), judge (judge.answers.shards) or eval (eval.shards); default generate",
    )  # fmt: skip
    sh.add_argument("--method", help="one method of the study (judge, eval: whose trained model answers)")
    sh.add_argument("--shard", required=True, type=int, help="which shard, 0 .. shards - 1")
    sh.add_argument("--seed", type=int, help="a replicate seed of the study (study.seeds)")
    sh.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param, as for run")  # fmt: skip
    sub.add_parser("check", help="validate every YAML under params/; report torch, the GPUs and vLLM")
    c = sub.add_parser("convert", help="convert the embedded default model (GGUF -> HF folder) now")
    c.add_argument("--name", default="smollm2-135m")
    f = sub.add_parser("figures", help="regenerate a study's figures and tables from its results (no model)")
    f.add_argument("--study", required=True, help="study name: the folder under --results-dir, e.g. demo")
    f.add_argument("--results-dir", default="results", help="where the study folders are (default: results)")
    f.add_argument("--spec", help="figures spec YAML (default: params/figures/<study>.yaml if it exists)")
    cp = sub.add_parser("compare", help="set a study's fresh runs beside a reference, within its seeds' spread")
    cp.add_argument("--study", required=True, help="study name: the folder under --results-dir, e.g. demo")
    cp.add_argument("--results-dir", default="results", help="where the fresh study folder is (default: results)")
    cp.add_argument(
        "--reference",
        help="a study folder holding the reference runs (default: the same study folder, whose "
        "first version of each run is the reference)",
    )
    cp.add_argument("--strict", action="store_true", help="exit 1 when a difference lies outside the band")
    pl = sub.add_parser(
        "plan", help="GPU memory and disk: a model's presets (--model) or every cell of a study (--study)"
    )
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model", help="a params model name (params/models/), a folder, tiny: / embedded:NAME or a hub id"
    )
    what.add_argument("--study", help="a study YAML: memory of each cell's training stages, disk, totals, fits")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (default 1)")
    pl.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU (default 80)")
    pl.add_argument("--micro-batch", type=int, default=1, help="--model: rows per GPU per step (DPO: pairs; default 1)")
    pl.add_argument("--seq-len", type=int, default=4096, help="--model: tokens per row (default 4096)")
    pl.add_argument("--no-checkpointing", action="store_true", help="--model: without gradient checkpointing")
    pl.add_argument("--precompute-ref", action="store_true", help="--model: DPO with precompute_ref_log_probs: true")
    pl.add_argument(
        "--precision", choices=["mixed", "bf16", "fp32"], default="mixed",
        help="--model: mixed (the GPU default: float32 master weights under bf16 autocast, 16 bytes/param), bf16 "
        "(pure, 8) or fp32",
    )  # fmt: skip
    sl = sub.add_parser("slurm", help="write sbatch scripts for a study: generation first, then one task per cell")
    sl.add_argument("--study", required=True, help="study YAML, e.g. params/studies/poster.yaml")
    sl.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per task (0: a CPU cluster; default 1)")
    sl.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: Slurm's); the tasks' thread count")
    sl.add_argument(
        "--setup",
        help="the environment line every script runs first, e.g. 'source .venv/bin/activate' or 'module load "
        "cuda; conda activate selftrain' (default: activate the virtualenv running this command, if any)",
    )
    sl.add_argument(
        "--nodes", type=int, default=1, help="nodes per cell; above 1 training spans them (training.launch)"
    )
    sl.add_argument("--time", default="24:00:00", help="time limit per task")
    sl.add_argument("--partition", help="Slurm partition")
    sl.add_argument("--dry-run", action="store_true", help="print the scripts instead of writing them")
    pw = sub.add_parser(
        "power", help="before a study runs: each paired comparison's minimum detectable difference and the items and "
        "seeds a named difference needs (stage 07's tables/power), from a pilot's results or given SDs",
    )  # fmt: skip
    pw.add_argument("--study", required=True, help="study YAML, e.g. params/studies/positive-control.yaml")
    pw.add_argument("--pilot", help="a study folder with results to read the SDs from (default: results/<study>)")
    metric = "METRIC=VALUE"
    pw.add_argument("--sd", nargs="+", metavar=metric, help="SD of the per-item differences, e.g. eval_sampled=0.3")
    pw.add_argument("--seed-sd", nargs="+", metavar=metric, help="SD across seeds of the per-seed mean difference")
    pw.add_argument("--difference", nargs="+", metavar=metric,
                    help="the difference to detect (default: figures.power.difference), e.g. quality=0.3")  # fmt: skip
    pw.add_argument("--items", nargs="+", metavar="METRIC=N", help="items per comparison (default: the study's params)")
    st = sub.add_parser(
        "status", help="every cell's stage states (done / running / failed and why / not started) and queued jobs"
    )
    st.add_argument("--study", required=True, help="study YAML, e.g. params/studies/poster.yaml")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="the overrides the cells were run with, as for run")  # fmt: skip
    st.add_argument("--seeds", nargs="+", type=int, help="only these replicate seeds")
    i = sub.add_parser("index", help="rewrite a study's README index from its run folders")
    i.add_argument("--study-dir", required=True, help="e.g. results/demo")
    k = sub.add_parser("clean", help="list and free checkpoints and caches no run references")
    k.add_argument("--results-dir", default="results")
    k.add_argument("--checkpoints-dir", default="checkpoints")
    k.add_argument("--cache-dir", default=".cache/selftrain")
    k.add_argument("--dry-run", action="store_true", help="only list what would be freed")
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from selftrain.runner import run_study, summary_table

    if args.verbose:  # the notebooks' output on the terminal as they run (it always goes to the run's logs/)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        logging.getLogger("papermill").addHandler(handler)
    results = run_study(
        args.study,
        args.models,
        args.methods,
        args.stages,
        args.overrides,
        args.new_version,
        log=_say,
        progress=True,
        stream=args.verbose,
        seeds=args.seeds,
        rounds=args.rounds,
    )
    print("\n" + summary_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED: {r.model}/{r.method} at {r.failed_stage}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _say(line: str) -> None:
    print(line, flush=True)  # each stage's line as it ends, also where stdout is a file (a Slurm job's log)


def cmd_shard(args: argparse.Namespace) -> int:
    for line in shard(args.study, args.model, args.stage, args.method, args.shard, args.seed, args.overrides):
        print(line)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from selftrain.hardware import check_gpu_visible, environment_lines

    files = sorted((project_root() / "params").rglob("*.yaml"))
    for f in files:
        validate_params_file(f)
    print(f"{len(files)} params files OK")
    print("\n".join(environment_lines()))
    check_gpu_visible()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from selftrain.models import convert_embedded

    print(convert_embedded(args.name))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from selftrain.figures import make_figures

    make_figures(args.study, args.results_dir, args.spec)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from selftrain.figures.compare import compare

    cmp = compare(args.study, args.results_dir, args.reference)
    print(cmp.summary())
    if cmp.paths:
        print(f"table: {cmp.paths[1]}")
    return 1 if args.strict and cmp.counts().get("outside") else 0


def cmd_plan(args: argparse.Namespace) -> int:
    for line in plan_lines(args):
        print(line)
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from selftrain.cli.slurm import render, write

    files = render(args.study, args.gpus_per_node, args.nodes, args.time, args.partition, setup=args.setup,
                   cpus_per_task=args.cpus_per_task)  # fmt: skip
    if args.dry_run:
        for name, text in files.items():
            print(f"# ---- {name}\n{text}")
    else:
        out = write(args.study, files)
        print(f"wrote {', '.join(files)} to {out}; submit with: bash {out / 'submit.sh'}")
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    from selftrain.cli.power import power_lines

    for line in power_lines(args):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from selftrain.cli.status import status_lines

    for line in status_lines(args.study, args.overrides, args.seeds):
        print(line)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from selftrain.report import write_study_index

    study_dir = study_dir_of(args.study_dir, "--study-dir")  # it writes <study-dir>/README.md
    if not study_dir.is_dir():
        raise FileNotFoundError(f"{study_dir}: no such study folder")
    print(write_study_index(study_dir))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from selftrain.cli.clean import clean, human, unreferenced

    items = unreferenced(args.results_dir, args.checkpoints_dir, args.cache_dir)
    for it in items:
        print(f"  {human(it.bytes):>9}  {it.path}  ({it.why})")
    freed = clean(items, args.dry_run)
    print(f"{len(items)} item(s), {'would free' if args.dry_run else 'freed'} {human(freed)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "shard": cmd_shard, "check": cmd_check, "convert": cmd_convert, "figures": cmd_figures,
    "compare": cmd_compare, "plan": cmd_plan, "slurm": cmd_slurm, "status": cmd_status, "index": cmd_index,
    "clean": cmd_clean, "power": cmd_power,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


SHARDED = ("generate", "judge", "eval")


def plan_lines(args: argparse.Namespace) -> list[str]:
    """`plan`: its bounds checked first (one line each), then a model's presets or a study's cells."""
    from selftrain import plan

    for flag, value, ok in (("--gpus", args.gpus, args.gpus >= 1), ("--gpu-mem", args.gpu_mem, args.gpu_mem > 0),
                            ("--micro-batch", args.micro_batch, args.micro_batch >= 1),
                            ("--seq-len", args.seq_len, args.seq_len >= 1)):  # fmt: skip
        if not ok:
            raise ConfigError(f"plan {flag} must be {'more than 0' if flag == '--gpu-mem' else 'at least 1'}, "
                              f"got {value:g}")  # fmt: skip
    if args.study:
        return plan.format_study(plan.plan_study(args.study, args.gpus, args.gpu_mem)).splitlines()
    cfg = None
    if (project_root() / "params" / "models" / f"{args.model}.yaml").is_file():
        from selftrain.config import resolve_run_config

        cfg = resolve_run_config(args.model, "central")
        shape = plan.run_shape(cfg)
    else:
        shape = plan.model_shape(args.model)
    rows = plan.plan(shape, args.gpus, args.gpu_mem, args.micro_batch, args.seq_len, not args.no_checkpointing,
                     args.precompute_ref, args.precision)  # fmt: skip
    lines = plan.format_plan(rows, shape, args.gpus, args.gpu_mem).splitlines()
    if cfg is not None:  # the model file's own settings, as stage 03/04 would run them
        lines.append(f"{args.model}'s own training settings on {args.gpus} GPU(s) of {args.gpu_mem:g} GiB:")
        for kind in ("sft", "dpo"):
            lines.append("  " + plan.describe(cfg, kind, args.gpus, args.gpu_mem * plan.GIB))
    return lines


def shard(
    study_path: str, model: str, stage: str, method: str | None, index: int, seed: int | None, overrides: list[str]
) -> list[str]:
    """Fill shard `index` of one stage for one cell of a study, at every sweep point of it; a line per point."""
    from selftrain.config import SEED_MAX, RunConfig, load_study, resolve_run_config
    from selftrain.hardware import check_gpu_visible
    from selftrain.runs import check_output_dirs

    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"command line: --seed {seed}: a seed must be in 0..{SEED_MAX}")
    check_gpu_visible()  # an array task on a GPU torch cannot use stops here
    study, _, path = load_study(study_path)
    if model not in study.models:
        raise ConfigError(f"{path}: model '{model}' is not in the study (models: {study.models})")
    if stage != "generate" and not method:
        raise ConfigError(f"shard --stage {stage}: name the cell's method (--method; the study has {study.methods})")
    if method and method not in study.methods:
        raise ConfigError(f"{path}: method '{method}' is not in the study (methods: {study.methods})")
    lines, seen = [], set()
    for point in study.points():
        # Generation depends on model, prompts and sampling only: any method of the study resolves them.
        cfg = resolve_run_config(model, method or study.methods[0], path, overrides, replicate=seed, point=point)
        check_output_dirs(cfg)  # the cache (and, for judge/eval, the results) folder it writes into
        run_shard: Callable[[RunConfig, int], dict[str, Any]]
        if stage == "generate":
            from selftrain.generate import run_shard
        elif stage == "judge":  # judge and eval: the cell's own run version, its training done
            from selftrain.judge import run_shard
        else:
            from selftrain.evaluate import run_shard
        done = run_shard(cfg, index)
        if done["cache"] in seen:
            continue
        seen.add(done["cache"])
        state = "generated" if done["generated"] else "already there"
        where = f" [{', '.join(f'{k}={v}' for k, v in point.items())}]" if point else ""
        lines.append(f"{stage} shard {done['shard']} of {done['shards']}{where} ({done['items']} prompts): {state} "
                     f"in {done['cache']}")  # fmt: skip
    return lines
