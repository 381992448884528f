"""Run a study: for each (model, method) cell, execute the stage notebooks with papermill into the run folder."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selftrain.config import SEED_MAX, ConfigError, RunConfig, load_study, resolve_run_config
from selftrain.data import check_sources
from selftrain.hardware import check_gpu_visible
from selftrain.paths import project_root
from selftrain.quiet import notebook_log
from selftrain.report import write_study_index
from selftrain.runs import Run, check_output_dirs, create_run, round_config
from selftrain.schema import NOTEBOOKS, STAGES, key_number, run_folder


class StageFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook, the cell and the error."""


class NotebookNotWritten(StageFailed):
    """papermill could not write the executed notebook (a full disk, a file size limit): the stage counts as
    failed even if its kernel finished it; the message names the file."""


@dataclass
class CellResult:
    model: str
    method: str
    run_dir: Path | None
    executed: list[str]
    skipped: list[str]
    seconds: float
    failed_stage: str | None = None
    error: str | None = None  # names the notebook, the cell and the exception

    @property
    def ok(self) -> bool:
        return self.error is None


def execute_stage(run: Run, stage: str, progress: bool = False, stream: bool = False) -> Path:
    """Execute one stage notebook with papermill; the executed copy lands in the run's notebooks/.

    papermill's lines, the cells' output and the kernel process's own stdout and stderr go to the stage's log
    (Run.log_file); stream=True also echoes them through the `papermill` logger and has the cells show the
    libraries' logs (the notebooks' `verbose`). papermill writes its copy as the cells run: it writes a temp file
    beside it that replaces the copy once complete, so a write that fails half-way leaves no truncated notebook.
    The kernel gets a temp folder of its own (TMPDIR), removed when it ends however it ends: what a killed engine
    leaves there (vLLM's vllm_dist_* rendezvous files) goes with it."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    src = project_root() / "notebooks" / NOTEBOOKS[stage]
    dst = run.notebooks_dir / NOTEBOOKS[stage]
    part = dst.with_name(f".{dst.stem}.partial{dst.suffix}")
    # The kernel is started as `python`; make that this interpreter (the venv's), whatever PATH says.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("SELFTRAIN_ROOT", str(project_root()))
    system_tmp = tempfile.gettempdir()  # this process keeps the system's temp folder; the kernel gets its own
    sweep_scratch(system_tmp)
    scratch = tempfile.mkdtemp(prefix=f"selftrain-{stage}-{os.getpid()}@{socket.gethostname()}-")
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    # The cache torch's compiler keeps in the temp folder by default stays where it was, shared across stages.
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(system_tmp, f"torchinductor_{user}"))
    try:
        with notebook_log(run.log_file(stage), verbose=stream) as kernel_manager:
            pm.execute_notebook(
                str(src),
                str(part),
                parameters={"run_dir": str(run.dir), **({"verbose": True} if stream else {})},
                cwd=str(project_root()),
                kernel_name="python3",
                progress_bar=progress,
                log_output=True,
                **({"kernel_manager_class": kernel_manager} if kernel_manager else {}),
            )
    except PapermillExecutionError as e:
        _keep_copy(part, dst)
        raise StageFailed(
            f"notebook {src.relative_to(project_root())} failed in cell {e.cell_index} "
            f"(executed copy: {dst}):\n  {e.ename}: {e.evalue}"
        ) from None
    except (DeadKernelError, CellTimeoutError, RuntimeError) as e:
        # The kernel died (OOM killer, segfault) or a cell ran past its timeout: this stage's failure only.
        _keep_copy(part, dst)
        cause = "kernel died" if isinstance(e, DeadKernelError) else type(e).__name__
        raise StageFailed(
            f"notebook {src.relative_to(project_root())}: {cause} (executed copy: {dst}):\n  {str(e)[:300]}"
        ) from None
    except OSError as e:  # papermill's own write of the executed copy (a full disk, a file size limit), mostly
        part.unlink(missing_ok=True)
        what = f"cannot write {dst}" if e.filename in (str(part), None) else str(e.filename)
        raise NotebookNotWritten(f"notebook {src.relative_to(project_root())}: {what}: {e.strerror or e}") from None
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        os.replace(part, dst)
    except OSError as e:
        raise NotebookNotWritten(f"cannot write {dst}: {e.strerror or e}") from None
    return dst


SCRATCH = re.compile(r"^selftrain-[a-z]+-(\d+)@(.+)-[a-z0-9_]+$")  # selftrain-<stage>-<pid>@<host>-<mkdtemp's>


def sweep_scratch(folder: str) -> list[Path]:
    """Removes the kernel temp folders (selftrain-<stage>-<pid>@<host>-*) of runners that are gone: a runner killed
    with SIGKILL cannot remove its own, and vLLM leaves its rendezvous file there. Only this user's, only this
    host's (a temp folder shared by cluster nodes holds other nodes' live runners), only dead pids."""
    import psutil

    gone = []
    host = socket.gethostname()
    for d in Path(folder).glob("selftrain-*"):
        m = SCRATCH.match(d.name)
        if not m or m.group(2) != host or not d.is_dir() or d.is_symlink():
            continue
        try:
            if d.stat().st_uid != os.getuid() or psutil.pid_exists(int(m.group(1))):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _keep_copy(part: Path, dst: Path) -> None:
    """A failed stage's executed copy stays for inspection when papermill wrote it whole; a truncated one goes."""
    try:
        json.loads(part.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        part.unlink(missing_ok=True)
        return
    with contextlib.suppress(OSError):
        os.replace(part, dst)


def preflight(cfg: RunConfig, stages: list[str]) -> list[str]:
    """What a cell's stages need that can be checked before any cell runs, instead of failing hours later in
    notebook 03, 05 or 06: the judge endpoint's API key variable, llm-jp-judge's checkout, the benchmark datasets
    folder and llm-jp-eval checkout, a training launch preset that needs GPUs. One line per problem."""
    problems: list[str] = []
    run = [s for s in cfg.stages if s in stages]
    trains = cfg.selection.method != "baseline" and {"sft", "dpo"} & set(run)

    def check(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # every kind of refusal these checks raise, each reported as one line
            problems.append(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    judge_used = "judge" in run or ("select" in run and cfg.selection.utility == "judge")
    if judge_used and cfg.judge.backend == "endpoint":
        from selftrain.graders.api import EndpointJudge, EndpointSettings

        check("judge.endpoint", lambda: EndpointJudge(
            EndpointSettings(**{"max_tokens": cfg.judge.max_new_tokens, **cfg.judge.endpoint})).close())  # fmt: skip
    if "judge" in run and cfg.judge.protocol == "llm-jp-judge":
        from selftrain.judge import llmjp

        check("judge.llm_jp_judge", lambda: llmjp.load_for(cfg.judge))
    if "eval" in run:
        from selftrain.evaluate import dataset_paths
        from selftrain.evaluate.protocols import load_protocol

        check("eval", lambda: load_protocol(cfg.eval))
        check("eval.datasets_dir", lambda: dataset_paths(cfg.eval.datasets_dir, cfg.eval.datasets))
    if trains and cfg.training.launch:
        from selftrain.train.launch import check_device

        check("training.launch", lambda: check_device(cfg))
    return problems


class _Console:
    """The runner's terminal: one aligned line per stage under a progress bar of the grid's stages (a terminal only;
    tqdm stays silent in a log file)."""

    def __init__(self, log: Callable[[str], None], total: int, width: int, progress: bool) -> None:
        self.log, self.width, self.bar = log, width, None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="grid", unit="stage", file=sys.stderr, disable=None, leave=False)

    def say(self, message: str) -> None:
        if self.bar is None or self.bar.disable:
            self.log(message)
            return
        with self.bar.external_write_mode(file=sys.stderr):  # the bar steps aside for the line
            self.log(message)

    def stage(self, cell: str, stage: str, seconds: float | None, what: str) -> None:
        took = f"{seconds:7.1f} s" if seconds is not None else " " * 9
        self.say(f"{cell:<{self.width}}  {stage:<8} {took}  {what}".rstrip())

    def running(self, cell: str, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{cell} {stage}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(
    study_path: str,
    models: list[str] | None = None,
    methods: list[str] | None = None,
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    new_version: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = False,
    stream: bool = False,
    seeds: list[int] | None = None,
    rounds: list[int] | None = None,
) -> list[CellResult]:
    """Run the grid cell by cell. A failing stage stops only its own (model, method, seed) cell: the other
    cells still run, and the returned results (and the log) say which cell failed where.

    log: one line per stage (cell, stage, seconds, its key number or the failure with the log's path); progress: a
    progress bar of the grid's stages on a terminal; stream: the notebooks' output and the libraries' logs echoed
    too (they always go to the run's logs/). seeds: replicate seeds (some of `study.seeds`, or any); None: the
    study's `seeds`, or the params' own. rounds: in a study with rounds, which rounds of each trained cell's chain
    to run (the last one brings the closing generation along); None: all, in order. A round that fails ends its
    chain; the other cells go on."""
    check_gpu_visible()  # a GPU that torch cannot use stops the run here, not after hours of CPU training
    study, _, path = load_study(study_path)
    bad_seeds = [s for s in seeds or [] if not 0 <= s <= SEED_MAX]
    if bad_seeds:
        raise ConfigError(f"command line: --seeds {bad_seeds}: a seed must be in 0..{SEED_MAX} (no cell was run)")
    replicates: list[int | None] = list(seeds if seeds is not None else study.seeds) or [None]
    points = study.points()
    models = models or study.models
    methods = methods or study.methods
    for name, chosen, allowed in (("model", models, study.models), ("method", methods, study.methods)):
        unknown = [x for x in chosen if x not in allowed]
        if unknown:
            raise ConfigError(f"{path}: {name}(s) {unknown} are not in this study (study has {allowed})")
    wanted = stages or study.stages
    bad_rounds = [r for r in rounds or [] if not 1 <= r <= study.rounds]
    if bad_rounds:
        raise ConfigError(f"command line: --rounds {bad_rounds}: the study has rounds 1..{study.rounds}")
    chained: dict[str, bool] = {}  # method -> whether its cells are chains of rounds
    bad = [s for s in wanted if s not in STAGES]
    if bad:
        raise ConfigError(f"command line: unknown stage(s) {bad} (known: {', '.join(STAGES)})")
    # Every cell's params before any cell runs: a typo in the last method's file is found in seconds, not after
    # the first cells ran for an hour; each distinct problem is reported once. So is what the stages need beyond
    # the params (an API key, a datasets folder, GPUs for a sharded launch), and where the cells would write.
    problems: list[str] = []
    steps, width = 0, 0
    for model in models:
        for method in methods:
            try:
                for rep in replicates:
                    for pt in points:
                        cfg = resolve_run_config(model, method, study_path, overrides, True, replicate=rep, point=pt)
                        chained[method] = cfg.round is not None
                        check_sources(cfg)
                        check_output_dirs(cfg)
                        problems += preflight(cfg, wanted)
                        chain = _chain(study.rounds if chained[method] else 1, rounds)  # a round: a cell
                        steps += len([s for s in cfg.stages if s in wanted]) * len(chain)
                        names = [f"{model}/{run_folder(method, cfg.replicate, cfg.sweep, i)}" for i in chain]
                        width = max([width, *map(len, names)])
            except ConfigError as e:
                problems += [x for x in str(e).replace("invalid params:", "").split("\n") if x.strip()]
    if problems:
        unique = list(dict.fromkeys(p.strip() for p in problems))
        raise ConfigError("invalid params (no cell was run):\n  " + "\n  ".join(unique))
    console = _Console(log, steps, width, progress)
    results = []
    try:
        for rep in replicates:  # seed-major: every method of the first seed is done before the next seed starts
            for model in models:
                for method in methods:
                    for pt in points:
                        for index in _chain(study.rounds if chained.get(method) else 1, rounds):
                            args = (wanted, overrides, new_version, console, stream, rep, pt, index)
                            results.append(_run_cell(study_path, model, method, *args))
                            if not results[-1].ok:
                                break  # the next round would start from a model this one did not make
    finally:
        console.close()
    failed = [r for r in results if not r.ok]
    if failed:
        log(f"{len(failed)} of {len(results)} cells failed: " + ", ".join(f"{r.model}/{r.method}" for r in failed))
    run_dirs = [r.run_dir for r in results if r.run_dir is not None]
    if run_dirs:
        readme = write_study_index(run_dirs[0].parents[2])  # results/<study>/<model>/<method>/<version>
        log(f"study index: {_shown(readme)}")
    return results


def _chain(count: int, wanted: list[int] | None) -> list[int | None]:
    """The round indices of one cell to run: [None] for a cell without rounds (when round 1 is wanted), else the
    wanted rounds of 1..count in order, with the closing generation (count + 1) after the last."""
    if count == 1:
        return [None] if wanted is None or 1 in wanted else []
    return [r for r in range(1, count + 2) if wanted is None or r in wanted or (r == count + 1 and count in wanted)]


def summary_table(results: list[CellResult]) -> str:
    """The closing table of a study run: each cell's result, stages run and skipped, seconds and run folder."""
    rows = [("cell", "result", "ran", "skipped", "seconds", "run folder")]
    for r in results:
        result = "ok" if r.ok else f"FAILED at {r.failed_stage}"
        ran, skipped = str(len(r.executed)), str(len(r.skipped))
        where = _shown(r.run_dir) if r.run_dir is not None else "-"
        rows.append((f"{r.model}/{r.method}", result, ran, skipped, f"{r.seconds:.1f}", where))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = (2, 3, 4)  # the counts and seconds
    return "\n".join(
        "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        for row in rows
    )


def _shown(path: Path) -> str:
    """A path as the user typed their way to it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _failure(e: Exception) -> str:
    """An error's first line that says what went wrong: a StageFailed's header names the notebook and its copy, the
    exception follows it (an error listing several bad records goes on; the closing FAILED lines show it whole)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if isinstance(e, StageFailed) and len(lines) > 1:
        lines = lines[1:]
    if not lines:
        return type(e).__name__
    return lines[0] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


def _run_cell(
    study_path: str,
    model: str,
    method: str,
    wanted: list[str],
    overrides: list[str] | None,
    new_version: bool,
    console: _Console,
    stream: bool,
    replicate: int | None = None,
    point: dict | None = None,
    round_index: int | None = None,
) -> CellResult:
    t0 = s0 = time.time()
    done: list[str] = []
    skipped: list[str] = []
    run = None
    stage = "params"
    cell = f"{model}/{method}"
    left = 0  # the cell's stages not yet counted on the progress bar
    try:
        cfg = round_config(round_index or 1, model, method, study_path, overrides, True, replicate, point)
        index = cfg.round.index if cfg.round is not None else None
        method = run_folder(method, cfg.replicate, cfg.sweep, index)  # the cell's name in the log and the summary
        cell = f"{model}/{method}"
        todo = [s for s in cfg.stages if s in wanted]
        left = len(todo)
        run = create_run(cfg, new_version=new_version, hold=True, log=lambda m: console.say(f"{cell}  {m}"))
        if run.note:
            console.say(f"{cell}  {run.note} -> {run.dir.name}")
        for stage in todo:
            s0 = time.time()
            if run.is_done(stage):
                console.stage(cell, stage, None, f"already done ({run.dir.name}), skipped")
                skipped.append(stage)
            else:
                console.running(cell, stage)
                execute_stage(run, stage, False, stream)
                why = run.skipped(stage)
                what = f"nothing to do: {why}" if why else key_number(run.dir, stage)
                console.stage(cell, stage, time.time() - s0, what)
                done.append(stage)
            left -= 1
            console.advance()
    except (StageFailed, ConfigError, OSError) as e:
        where = f" (log: {_shown(run.log_file(stage))})" if run is not None and stage in STAGES else ""
        console.stage(cell, stage, time.time() - s0, f"FAILED: {_failure(e)}{where}")
        console.advance(left)
        if run is not None and stage in run.config.stages:
            try:  # a dead kernel could not record it itself; an unwritten notebook undoes a finished stage
                run.mark_failed(stage, str(e), even_if_done=isinstance(e, NotebookNotWritten))
            except OSError as w:  # the disk that failed the stage may refuse the manifest too: say so, go on
                console.say(f"{cell}  {stage}: could not record the failure in {run.manifest_path}: {w}")
        return CellResult(
            model, method, run.dir if run else None, done, skipped, round(time.time() - t0, 1), stage, str(e)
        )
    finally:
        if run is not None:
            run.release()
    return CellResult(model, method, run.dir, done, skipped, round(time.time() - t0, 1))
