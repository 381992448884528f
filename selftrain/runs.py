"""Run folders: results/<study>/<model>/<method>/<version>/ with params, manifest and stage markers.

A version folder is written once. A stage is done only when ``stages/<stage>/_SUCCESS`` exists; that
file is written last, after every output of the stage has been renamed into place, so a killed run
never leaves a half-written output that a resumed run would consume.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from selftrain.config import ConfigError, RunConfig, dump_config, load_resolved, resolve_run_config
from selftrain.inference import exact_numerics, free_memory, release_frames
from selftrain.io import FileLock, atomic_write_text, read_json, read_jsonl, sha256_file, sha256_json, write_json
from selftrain.models import resolve_model_path
from selftrain.paths import UnsafePath, output_folder, resolve_path
from selftrain.provenance import cached_sha256, git_state, hardware, input_fingerprint, package_versions
from selftrain.quiet import quiet_logs
from selftrain.schema import NOTEBOOKS, VERSION, read_metrics, run_folder

# Nested parts of a metrics file that have a view of their own (criteria, categories, datasets) or are noise
# in a one-column summary.
_SUMMARY_SKIP = {"datasets", "categories", "errors", "quality", "safety", "endpoint_stats", "batch_check", "sampling"}


class StageNotDone(RuntimeError):
    """A stage needs another stage's outputs; the message names the notebook to run first."""


def _interrupt_in_one_line(e: KeyboardInterrupt, stage: str) -> None:
    """What a notebook shows for an interrupted stage: one line, not a traceback through every frame the stage went
    through. IPython asks an exception for `_render_traceback_` when it shows it, once every frame has returned:
    their locals (the model, an engine, a trainer) are cleared then, so the line says true."""

    def render() -> list[str]:
        release_frames(e)
        free_memory()
        return [f"KeyboardInterrupt: stage {stage} stopped; its model was released (run the cell again to redo it)"]

    e._render_traceback_ = render  # type: ignore[attr-defined]  # IPython looks the hook up on the exception


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Run:
    """One (study, model, method, version) folder and its resolved params."""

    dir: Path
    config: RunConfig
    note: str = ""  # why create_run started this version rather than resuming the last one
    verbose: bool = False  # show third-party library logs in the cell instead of logs/<stage>.log
    lock: FileLock | None = field(default=None, repr=False, compare=False)  # held while a runner runs this version

    def release(self) -> None:
        """Let another run of this cell have the version (the kernel drops the lock anyway when this process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ layout
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    @property
    def figures_dir(self) -> Path:
        return self.dir / "figures"

    @property
    def notebooks_dir(self) -> Path:
        return self.dir / "notebooks"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def marker(self, stage: str) -> Path:
        return self.dir / "stages" / stage / "_SUCCESS"

    def log_file(self, stage: str) -> Path:
        """A stage's log: the libraries' logs of its cells and, run by the runner, its notebook's whole output."""
        return self.dir / "logs" / f"{stage}.log"

    def is_done(self, stage: str) -> bool:
        """Done: the marker exists and every output it recorded is there with its recorded sha256."""
        return self.marker(stage).is_file() and not self.damaged_outputs(stage)

    def damaged_outputs(self, stage: str) -> list[str]:
        """Outputs of a finished stage that are missing or changed since it finished (empty when intact)."""
        try:
            outputs = self.stage_record(stage).get("outputs") or {}
        except (OSError, ValueError):
            return [str(self.marker(stage))]
        bad = []
        for rel, digest in outputs.items():
            p = Path(rel) if Path(rel).is_absolute() else self.dir / rel
            if not p.is_file():
                bad.append(f"{rel} (missing)")
            elif cached_sha256(p) != digest:
                bad.append(f"{rel} (changed)")
        return bad

    def intact(self) -> bool:
        """Every stage with a marker still has its outputs: a version that can be resumed."""
        return all(not self.damaged_outputs(s) for s in self.config.stages if self.marker(s).is_file())

    def is_complete(self) -> bool:
        return all(self.is_done(s) for s in self.config.stages)

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path)

    def _update_manifest(self, fn: Any) -> None:
        m = self.manifest()
        fn(m)
        write_json(self.manifest_path, m)

    @contextlib.contextmanager
    def stage(self, name: str, inputs: list[Path] | None = None) -> Iterator[dict[str, Any]]:
        """Time a stage, record status/hashes in the manifest, write its _SUCCESS marker last.

        The body fills the yielded dict's "outputs" (paths) and "metrics" (small JSON values).
        """
        info: dict[str, Any] = {"outputs": [], "metrics": {}}
        start = time.time()

        def _set(status: str, **extra: Any) -> None:
            def fn(m: dict) -> None:
                m["stages"][name] = {"status": status, **extra}

            self._update_manifest(fn)

        def _failed(e: BaseException) -> None:
            self.marker(name).unlink(missing_ok=True)
            # A full disk can refuse the manifest too: the stage's own error is the one to raise.
            with contextlib.suppress(OSError):
                _set("failed", error=f"{type(e).__name__}: {e}", seconds=round(time.time() - start, 2))

        self.marker(name).unlink(missing_ok=True)
        _set("running", started=_now())
        exact_numerics(self.config.numerics == "exact")
        log_file = self.log_file(name)
        try:
            with quiet_logs(log_file, self.verbose):
                yield info
        except BaseException as e:
            _failed(e)
            if isinstance(e, KeyboardInterrupt):
                _interrupt_in_one_line(e, name)
            raise
        try:
            record = self._finish(name, info, start, inputs)
        except BaseException as e:  # the manifest or the marker could not be written: failed, never "done"
            _failed(e)
            raise
        facts = ", ".join(f"{k} {v}" for k, v in info["metrics"].items() if isinstance(v, int | float | str))[:160]
        logs = f"; library logs: {log_file.relative_to(self.dir)}" if log_file.is_file() and not self.verbose else ""
        print(f"{name}: done in {record['seconds']:.0f} s" + (f"; {facts}" if facts else "") + logs)

    def _finish(self, name: str, info: dict[str, Any], start: float, inputs: list[Path] | None) -> dict[str, Any]:
        """Record a finished stage in the manifest, then write its marker, last."""
        record = {
            "status": "done",
            "finished": _now(),
            "seconds": round(time.time() - start, 2),
            "inputs": {str(p): sha256_file(p) for p in (inputs or []) if Path(p).is_file()},
            "outputs": {
                str(Path(p).relative_to(self.dir)) if Path(p).is_relative_to(self.dir) else str(p): sha256_file(p)
                for p in info["outputs"]
                if Path(p).is_file()
            },
            "metrics": info["metrics"],
            # What changes the numbers across machines: the dtype and backend this stage actually ran.
            "numerics": {"mode": self.config.numerics, **info.get("numerics", {})},
        }

        def fn(m: dict) -> None:
            m["stages"][name] = record

        self._update_manifest(fn)
        atomic_write_text(self.marker(name), json.dumps(record, indent=2, default=str) + "\n")
        return record

    def mark_failed(self, name: str, error: str, even_if_done: bool = False) -> None:
        """Record a stage as failed from outside its process (its kernel died before it could). even_if_done: also
        when the stage finished in its kernel but what the runner writes after it (the executed notebook) failed:
        its marker goes, so the manifest never says "done" for a stage the run reports as failed."""
        if self.is_done(name):
            if not even_if_done:
                return
            self.marker(name).unlink(missing_ok=True)
        stages = self.manifest().get("stages", {})
        if stages.get(name, {}).get("status") == "failed" and not even_if_done:
            return

        def fn(m: dict) -> None:
            m["stages"][name] = {**m["stages"].get(name, {}), "status": "failed", "error": error}

        self._update_manifest(fn)

    def stage_record(self, name: str) -> dict[str, Any]:
        return json.loads(self.marker(name).read_text())

    def require(self, stage: str, why: str = "") -> None:
        """Raise StageNotDone unless `stage` is done in this run: the one "run X first" error of every stage."""
        if not self.is_done(stage):
            nb = NOTEBOOKS[stage].removesuffix(".ipynb")
            if self.marker(stage).is_file():  # finished once, but its outputs are gone or edited since
                damaged = ", ".join(self.damaged_outputs(stage))
                raise StageNotDone(f"{self.dir}: stage '{stage}' outputs no longer match: {damaged}; rerun {nb}")
            raise StageNotDone(f"{self.dir}: stage '{stage}' is not done{why}; run {nb} first")

    def skipped(self, stage: str) -> str | None:
        """Why a done stage had nothing to do (e.g. select for `baseline`), or None."""
        if not self.is_done(stage):
            return None
        return (self.stage_record(stage).get("metrics") or {}).get("skipped")

    # ------------------------------------------------------------------ views
    def metrics_table(self, stage: str) -> Any:
        """A stage's metrics file as a one-column table (nested keys as "a: b"); one row saying why for a
        skipped stage. Large nested parts (criteria, categories, datasets) have views of their own."""
        import pandas as pd

        why = self.skipped(stage)
        if why:
            return pd.DataFrame({"value": [why]}, index=["skipped"])
        flat: dict[str, Any] = {}

        def walk(d: dict[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if k in _SUMMARY_SKIP:
                    continue
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}: ")
                elif isinstance(v, list):
                    flat[prefix + k] = ", ".join(map(str, v))
                else:
                    flat[prefix + k] = v

        walk(read_metrics(self.dir, stage), "")
        return pd.DataFrame({"value": [str(v) if v is not None else "-" for v in flat.values()]}, index=list(flat))

    def save_figure(self, fig: Any, name: str) -> list[Path]:
        """figures/<name>.png and .pdf, then close the figure (the notebook draws its own copy)."""
        from selftrain.plotting import save_figure

        return save_figure(fig, self.figures_dir / name)

    def checkpoints_root(self) -> Path:
        """<checkpoints_dir>/<study>/<model>/<method>/<version>-<id>; the id (run folder + creation time) keeps a
        recreated v001, or one under another results_dir, from resuming someone else's state."""
        run_id = sha256_json([str(self.dir.resolve()), self.manifest().get("created")])[:8]
        c = self.config
        root = resolve_path(c.output.checkpoints_dir)
        folder = c.method if c.round is None else self.dir.parent.name  # a round's models: <method>@round=<r>/
        return root / c.study / c.model.name / folder / f"{self.dir.name}-{run_id}"

    def checkpoints_dir(self, stage: str) -> Path:
        """Where a training stage keeps its Trainer checkpoints (trainer/) and its final model (final/)."""
        return self.checkpoints_root() / stage

    # ------------------------------------------------------------------ the model of this run
    def start_model(self) -> Path:
        """The model this run's training starts from: model.path (M0; in round r of a study with rounds, round
        r-1's final model, which also generated this round's candidates), or M0 again under rounds.start m0."""
        c = self.config
        path = c.round.m0 if c.round is not None and c.rounds.start == "m0" else c.model.path
        return resolve_model_path(path, c.output.cache_dir)

    def final_model(self) -> Path:
        """The model later stages judge and evaluate: DPO output, else SFT output, else the model training would
        start from (M0 for baseline)."""
        for stage in ("dpo", "sft"):
            if self.is_done(stage):
                path = (self.stage_record(stage).get("metrics") or {}).get("model_path")
                if path:
                    return Path(path)
        return self.start_model()

    def earlier_rounds(self, name: str) -> tuple[list[dict[str, Any]], Path | None]:
        """Under rounds.start m0, the training records (`name`: sft.jsonl or dpo.jsonl) that rounds 1..r-1 trained
        on, which round r trains on again with its own (data accumulated, from M0), and the file they come from;
        ([], None) otherwise. Round r-1's file already holds rounds 1..r-2's."""
        c = self.config
        if c.round is None or c.rounds.start != "m0" or c.round.previous is None:
            return [], None
        path = Path(c.round.previous) / "data" / name
        if not path.is_file():
            raise StageNotDone(f"{path}: round {c.round.index - 1}'s training data is missing (rounds.start m0)")
        return read_jsonl(path), path

    def model_under_test(self) -> Path:
        """What stages 05 (judge) and 06 (eval) assess: M0 for `baseline`, else the final trained model.

        Refuses to fall back to M0 silently when a training stage of this run has not finished.
        """
        if self.config.selection.method != "baseline":
            for stage in ("sft", "dpo"):
                if stage in self.config.stages:
                    self.require(stage, " (judge and eval assess the trained model)")
        return self.final_model()

    def skip_stage(self, name: str, reason: str) -> None:
        """Mark a stage that has nothing to do for this method (e.g. select for `baseline`)."""
        with self.stage(name) as info:
            info["metrics"] = {"skipped": reason}


def _versions_of(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted((p for p in parent.iterdir() if p.is_dir() and VERSION.match(p.name)), key=lambda p: p.name)


def check_output_dirs(cfg: RunConfig) -> None:
    """The folders a run writes into (results, checkpoints, cache) must not be source folders of the repository:
    inside it only results/, checkpoints/, .cache/ (and bench/out/) are written; outside it anything but a folder
    holding the repository."""
    for key in ("results_dir", "checkpoints_dir", "cache_dir"):
        try:
            output_folder(getattr(cfg.output, key), f"output.{key}", below=False)
        except UnsafePath as e:
            raise ConfigError(str(e)) from None


def run_parent(cfg: RunConfig) -> Path:
    """results/<study>/<model>/<method>[.seed<N>]; refuses any name that would lead outside the results folder."""
    check_output_dirs(cfg)
    root = resolve_path(cfg.output.results_dir).resolve()
    index = cfg.round.index if cfg.round is not None else None
    parent = (root / cfg.study / cfg.model.name / run_folder(cfg.method, cfg.replicate, cfg.sweep, index)).resolve()
    if not parent.is_relative_to(root) or len(parent.relative_to(root).parts) != 3:
        raise ConfigError(
            f"study/model/method names {cfg.study!r}/{cfg.model.name!r}/{cfg.method!r} would write outside {root}"
        )
    return parent


def versions(cfg: RunConfig) -> list[Path]:
    """The cell's version folders, oldest first (what `selftrain status` reads)."""
    return _versions_of(run_parent(cfg))


def open_run(run_dir: str | Path) -> Run:
    """Open an existing run folder (what each notebook does with its `run_dir` parameter)."""
    d = resolve_path(run_dir)
    params = d / "params.resolved.yaml"
    if not params.is_file():
        raise FileNotFoundError(f"{d}: not a run folder (no params.resolved.yaml)")
    return Run(d, load_resolved(params))


def _resumable(cfg: RunConfig, versions: list[Path]) -> tuple[Run | None, str]:
    """The newest version if it was made with these params and inputs and its outputs are intact, else None and,
    where a version with these params exists, why it cannot be resumed."""
    if not versions:
        return None, ""
    last = versions[-1]
    p = last / "params.resolved.yaml"
    if not (p.is_file() and p.read_text() == dump_config(cfg) and (last / "manifest.json").is_file()):
        return None, ""
    run = Run(last, cfg)
    inputs, recorded = input_fingerprint(cfg), run.manifest().get("inputs") or {}
    changed = sorted(k for k in inputs.keys() | recorded.keys() if inputs.get(k) != recorded.get(k))
    damaged = [f"{s}: {', '.join(run.damaged_outputs(s))}" for s in cfg.stages
               if run.marker(s).is_file() and run.damaged_outputs(s)]  # fmt: skip
    if not changed and not damaged:
        return run, ""
    # Never resume over changed inputs or into a version whose outputs are gone (a committed
    # reference keeps no candidates or checkpoints): a new version says why.
    if changed:
        return None, f"inputs changed since {last.name}: {', '.join(changed[:3])}"
    return None, f"{last.name} has missing or changed outputs ({'; '.join(damaged)[:200]})"


def find_run(cfg: RunConfig) -> Run:
    """The run version `create_run` would resume for these params; never creates one (what a shard task of
    stage 05/06 opens: the cell's own run folder, written only by the cell)."""
    run, why = _resumable(cfg, _versions_of(run_parent(cfg)))
    if run is None:
        raise ConfigError(
            f"{run_parent(cfg)}: no run version to resume for {cfg.model.name}/{cfg.method} "
            f"({why or 'none was made with these params'}); run the cell's earlier stages first"
        )
    return run


def round_config(
    index: int,
    model: str,
    method: str,
    study: str | Path,
    overrides: list[str] | None = None,
    check_trainer: bool = False,
    replicate: int | None = None,
    point: dict[str, Any] | None = None,
) -> RunConfig:
    """Round `index`'s params in a study with rounds: round 1's as resolve_run_config makes them, then each later
    round's from the run of the round before it (the version create_run would resume for its params, its training
    done): that run's folder and final model, which generates this round's candidates. Round 1 (and any cell of a
    study without rounds, with index 1) needs no earlier run. ConfigError naming the round when one is missing."""
    cfg = resolve_run_config(model, method, study, overrides, check_trainer, replicate, point)
    if index > 1 and cfg.round is None:
        why = "baseline is not retrained" if cfg.selection.method == "baseline" else "the study has no rounds"
        raise ConfigError(f"{model}/{method}: no round {index} ({why})")
    for i in range(2, index + 1):
        try:
            prev = find_run(cfg)
            trained = prev.model_under_test()
        except (ConfigError, StageNotDone) as e:
            why = f"round {i} of {model}/{method} starts from round {i - 1}'s final model, which is not there"
            raise ConfigError(f"{why}: {e}") from None
        previous = (str(prev.dir), str(trained))
        cfg = resolve_run_config(model, method, study, overrides, check_trainer, replicate, point, i, previous)
    return cfg


def version_lock(run_dir: Path) -> FileLock:
    """The lock a runner holds on a version folder while it runs it: one run of a cell at a time."""
    return FileLock(run_dir / ".lock")


def create_run(
    cfg: RunConfig, new_version: bool = False, hold: bool = False, log: Callable[[str], None] | None = None
) -> Run:
    """Resume the newest version made with the same params, or start the next version.

    A version whose params differ is never touched; `new_version=True` always starts a fresh one. The choice is made
    under a lock on the cell's folder, so two processes never both start (or both pick) a version. hold=True (the
    runner): the returned run holds its version's lock until `release()` or this process ends; a version another
    runner holds is waited for (`log` says by whom), then resumed, so two runs of one cell never share a version
    at once, and a version whose runner died (the kernel dropped its lock) is resumed as any unfinished one."""
    parent = run_parent(cfg)
    while True:
        with FileLock(parent / ".lock"):
            run, busy = _claim(cfg, parent, new_version, hold)
            if run is not None:
                return run
        assert busy is not None  # _claim gives a run or the lock of the version in use
        # Another runner runs this cell's version: wait for it to end outside the cell's lock, then decide again
        # (its stages are then done and skipped, or it failed and this run resumes it).
        if log is not None:
            owner = busy.owner()
            log(f"{busy.path.parent} is in use by another run of this cell{f' ({owner})' if owner else ''}; waiting "
                "for it to finish")  # fmt: skip
        with busy:
            pass


def _claim(cfg: RunConfig, parent: Path, new_version: bool, hold: bool) -> tuple[Run | None, FileLock | None]:
    """Under the cell's lock: (the run to use, None), or (None, the lock of the version another runner holds)."""
    versions = _versions_of(parent)
    note = ""
    if not new_version and versions:
        lock = version_lock(versions[-1])
        if hold and not lock.acquire(wait=False):
            p = versions[-1] / "params.resolved.yaml"
            if p.is_file() and p.read_text() == dump_config(cfg):
                return None, lock  # same params, in use: wait for it
            # other params: never this run's version anyway
        run, why = _resumable(cfg, versions)
        if run is not None:
            run.lock = lock if hold else None
            return run, None
        lock.release()
        note = f"new version: {why}" if why else ""
    last = VERSION.match(versions[-1].name) if versions else None
    num = int(last.group(1)) + 1 if last else 1
    while True:
        d = parent / f"v{num:03d}"
        try:
            d.mkdir(parents=True, exist_ok=False)  # exclusive: two runners never share a version
            break
        except FileExistsError:
            num += 1
    lock = version_lock(d)
    if hold:
        lock.acquire()  # nobody else can know this folder yet: the cell's lock is held
    for sub in ("data", "metrics", "figures", "notebooks", "stages"):
        (d / sub).mkdir()
    atomic_write_text(d / "params.resolved.yaml", dump_config(cfg))
    manifest = {
        "study": cfg.study,
        "model": cfg.model.name,
        "method": cfg.method,
        "version": d.name,
        "created": _now(),
        "git": git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "seeds": {
            "seed": cfg.seed,
            "generation": cfg.generation.seed,
            "judge_answers": cfg.judge.answers.seed,
            "replicate": cfg.replicate,
        },
        "params_sha256": sha256_json(cfg.model_dump(mode="json")),
        "inputs": input_fingerprint(cfg),
        "stages": {s: {"status": "pending"} for s in cfg.stages},
    }
    write_json(d / "manifest.json", manifest)
    return Run(d, cfg, note, lock=lock if hold else None), None


SCRATCH = "scratch"  # the study name of interactive runs: results/scratch/..., never a study's own folders


def scratch_run(
    model: str = "smollm2-135m",
    method: str = "central",
    study: str | None = "params/studies/demo.yaml",
    overrides: list[str] | None = None,
) -> Run:
    """A run for interactive use: what a notebook opens when its `run_dir` parameter is empty.

    It takes the study file's settings but lives under results/scratch/<model>/<method>/, so exploring never
    adds versions to (or resumes) a study's runs; the same settings resume the same scratch version."""
    return create_run(resolve_run_config(model, method, study, [f"study={SCRATCH}", *(overrides or [])]))


def open_or_scratch(
    run_dir: str,
    study: str,
    model: str,
    method: str,
    results_dir: str = "results",
    overrides: list[str] | tuple[str, ...] = (),
    verbose: bool = False,
) -> Run:
    """What a notebook does with its parameters: the given run folder, else a scratch run with `overrides`
    ("section.key=value" strings, validated as `--set` is). verbose: library logs in the cell, not in
    logs/<stage>.log."""
    if run_dir:
        if overrides:
            raise ConfigError(
                f"overrides {list(overrides)} given with run_dir {run_dir!r}: a run's params are fixed; "
                "leave run_dir empty to explore with overrides in a scratch run"
            )
        run = open_run(run_dir)
        run.verbose = verbose
        return run
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    run = scratch_run(model, method, study or None, [f"output.results_dir={results_dir}", *overrides])
    run.verbose = verbose
    return run
