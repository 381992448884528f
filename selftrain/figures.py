"""Stage 07: the study's figures and tables, regenerated from its run folders alone (no model is loaded).

For every (model, method) of ``results/<study>/`` one run version is chosen: the newest complete one, or the
version pinned in ``params/figures/<study>.yaml``::

    figures:
      pins:
        smollm2-135m/central: v001

so a figure never silently changes source. A run without a complete version, a stage that is not done or
a metrics file that is not there is listed in ``missing`` (and in ``tables/missing.md``) and leaves
blanks; it never stops the figures. Outputs: ``results/<study>/figures/*.png|pdf`` and
``results/<study>/tables/*.csv|md|tex``.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from selftrain.config import METHODS, ConfigError, load_study, load_yaml
from selftrain.io import DataError, atomic_write_text, read_json
from selftrain.judge import QUALITY
from selftrain.paths import project_root, resolve_path
from selftrain.plots import plt, save_figure
from selftrain.report import write_study_index
from selftrain.select import DECISIONS

_VERSION = re.compile(r"^v\d{3,}$")
# Metrics files each done (not skipped) stage must have left; generate's are not used by any figure.
STAGE_METRICS = {
    "select": ("select.json",),
    "sft": ("sft.json", "sft_log.json"),
    "dpo": ("dpo.json", "dpo_log.json"),
    "judge": ("judge.json",),
    "eval": ("eval.json",),
}
# One colour per method, fixed, so a method looks the same in every figure.
COLORS = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green"), strict=True))
# The main table: these columns, with eval_<category> columns between eval_avg and sft_examples.
MAIN_HEAD = [
    "model", "method", "version", "state",
    "overall", "overall_ci_low", "overall_ci_high", *(c for c in QUALITY if c != "overall"),
    "safety", "safety_ci_low", "safety_ci_high", "violation_rate", "acceptable_rate", "eval_avg",
]  # fmt: skip
MAIN_TAIL = ["sft_examples", "dpo_pairs"]
JUDGE_COLUMNS = ["model", "method", "set", "criterion", "mean", "ci_low", "ci_high", "n"]
SELECTION_COLUMNS = [
    "model", "method", "version", "prompts", *DECISIONS, "dropped_share", "replaced_share",
    "original_low_share", "original_rank_mean", "pool_size", "sft_examples", "dpo_pairs",
]  # fmt: skip
TEXT_COLUMNS = {"model", "method", "version", "state", "set", "criterion", "what"}
COUNT_COLUMNS = {"n", "prompts", *DECISIONS, "pool_size", "sft_examples", "dpo_pairs"}


@dataclass
class StudyResults:
    """What `collect` read and `make_figures` wrote for one study."""

    study: str
    study_dir: Path
    models: list[str]
    methods: list[str]
    table: pd.DataFrame  # the main results table: one row per (model, method)
    judge: pd.DataFrame  # long: model, method, set, criterion, mean, ci_low, ci_high, n
    selection: pd.DataFrame  # one row per retrained (model, method): decision counts and shares
    logs: pd.DataFrame  # long: model, method, kind (sft|dpo), step, loss, rewards/...
    runs: dict[tuple[str, str], Path]  # the chosen version folder of each (model, method)
    missing: list[dict[str, str]]  # model, method, version, what
    spec_path: Path | None = None
    pins: dict[tuple[str, str], str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    index: Path | None = None  # the refreshed study README

    def missing_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.missing, columns=["model", "method", "version", "what"])


# ------------------------------------------------------------------------------------------- spec


def load_spec(path: str | Path) -> dict[tuple[str, str], str]:
    """Read a figures spec; returns {(model, method): version}. Unknown keys and malformed pins are errors
    naming the file and the key."""
    path = Path(path)
    data = load_yaml(path)
    for key in data:
        if key != "figures":
            raise ConfigError(f"{path}: unknown key '{key}' (expected: figures)")
    block = data.get("figures") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: key 'figures' must be a mapping")
    for key in block:
        if key != "pins":
            raise ConfigError(f"{path}: unknown key 'figures.{key}' (expected: pins)")
    pins = block.get("pins") or {}
    if not isinstance(pins, dict):
        raise ConfigError(f"{path}: key 'figures.pins' must be a mapping of 'model/method' to a version")
    out = {}
    for key, version in pins.items():
        parts = str(key).split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{path}: key 'figures.pins.{key}': must look like 'model/method'")
        if not isinstance(version, str) or not _VERSION.match(version):
            raise ConfigError(f"{path}: key 'figures.pins.{key}': version must look like v001 (got {version!r})")
        out[(parts[0], parts[1])] = version
    return out


def default_spec_path(study: str) -> Path | None:
    p = project_root() / "params" / "figures" / f"{study}.yaml"
    return p if p.is_file() else None


def _study_grid(study: str, study_file: str | Path | None) -> tuple[list[str], list[str]]:
    """The study YAML's models (in its order: small to large in this project) and methods, if it is known."""
    path = Path(study_file) if study_file else project_root() / "params" / "studies" / f"{study}.yaml"
    if not path.is_file():
        return [], []
    st, _, _ = load_study(path)
    return list(st.models), list(st.methods)


def _method_key(m: str) -> tuple[int, str]:
    return (METHODS.index(m), "") if m in METHODS else (len(METHODS), m)


# ------------------------------------------------------------------------------------------- collect


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path) if path.is_file() else None
    except DataError:
        return None


def _is_complete(d: Path) -> bool:
    stages = _planned(d)
    return bool(stages) and all((d / "stages" / s / "_SUCCESS").is_file() for s in stages)


def _planned(d: Path) -> list[str]:
    p = d / "params.resolved.yaml"
    if p.is_file():
        try:
            stages = (yaml.safe_load(p.read_text()) or {}).get("stages")
            if stages:
                return list(stages)
        except yaml.YAMLError:
            pass
    m = _read(d / "manifest.json") or {}
    return list(m.get("stages", {}))


def _pool_size(d: Path) -> int | None:
    p = d / "params.resolved.yaml"
    try:
        n = (yaml.safe_load(p.read_text()) or {}).get("generation", {}).get("n") if p.is_file() else None
    except yaml.YAMLError:
        return None
    return n + 1 if isinstance(n, int) else None  # the original's rank is among candidates + original


def _choose(
    study_dir: Path, pins: dict[tuple[str, str], str], spec_path: Path | None
) -> tuple[dict[tuple[str, str], Path], list[dict[str, str]]]:
    chosen, notes = {}, []
    found = {(p.parent.parent.name, p.parent.name) for p in study_dir.glob("*/*/v*") if _VERSION.match(p.name)}
    for key, version in pins.items():
        if not (study_dir / key[0] / key[1] / version / "manifest.json").is_file():
            have = sorted(p.name for p in (study_dir / key[0] / key[1]).glob("v*") if (p / "manifest.json").is_file())
            raise ConfigError(
                f"{spec_path}: key 'figures.pins.{key[0]}/{key[1]}': version {version} not found under "
                f"{study_dir / key[0] / key[1]} (have: {', '.join(have) or 'none'})"
            )
    for model, method in sorted(found):
        if (model, method) in pins:
            chosen[(model, method)] = study_dir / model / method / pins[(model, method)]
            continue
        versions = sorted(
            (p for p in (study_dir / model / method).iterdir() if _VERSION.match(p.name) and p.is_dir()),
            key=lambda p: int(p.name[1:]),
        )
        versions = [v for v in versions if (v / "manifest.json").is_file()]
        if not versions:
            notes.append({"model": model, "method": method, "version": "-", "what": "no run folder with a manifest"})
            continue
        complete = [v for v in versions if _is_complete(v)]
        # No complete version: show the newest one's partial results (its missing stages get reported).
        chosen[(model, method)] = complete[-1] if complete else versions[-1]
    return chosen, notes


def _missing_of(model: str, method: str, d: Path) -> list[dict[str, str]]:
    """Stages not done and metrics files absent in one run folder (skipped stages are not missing)."""
    out = []
    manifest = _read(d / "manifest.json") or {}
    stages = manifest.get("stages", {})
    for s in _planned(d):
        rec = stages.get(s, {})
        if not (d / "stages" / s / "_SUCCESS").is_file():
            status = rec.get("status", "not run")
            err = f": {str(rec['error']).splitlines()[0][:200]}" if rec.get("error") else ""
            out.append({"model": model, "method": method, "version": d.name, "what": f"stage {s} {status}{err}"})
            continue
        if (rec.get("metrics") or {}).get("skipped"):
            continue
        for f in STAGE_METRICS.get(s, ()):
            p = d / "metrics" / f
            if _read(p) is None:
                why = "unreadable" if p.is_file() else "missing"
                out.append({"model": model, "method": method, "version": d.name, "what": f"metrics/{f} {why}"})
    return out


def _num(x: Any) -> float:
    """A number as float (numpy scalars included), anything else (None, text, bool) as NaN."""
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_) else math.nan


def _row(model: str, method: str, d: Path | None, state: str) -> tuple[dict, list[dict], dict | None, list[dict]]:
    """The main-table row, judge rows, selection row and log rows of one run folder (None: no folder)."""
    row: dict[str, Any] = {"model": model, "method": method, "version": d.name if d else "", "state": state}
    if d is None:
        return row, [], None, []
    metric = {k: _read(d / "metrics" / f"{k}.json") or {} for k in ("select", "judge", "eval")}
    judge_rows = []
    for kind in ("quality", "safety"):
        s = metric["judge"].get(kind, {})
        for c, v in s.get("criteria", {}).items():
            judge_rows.append({"model": model, "method": method, "set": kind, "criterion": c, **_ci(v, "mean")})
        for name in ("violation_rate", "acceptable_rate"):
            if name in s:
                judge_rows.append({"model": model, "method": method, "set": kind, "criterion": name, **_ci(s[name])})
    crit = {(r["set"], r["criterion"]): r for r in judge_rows}
    q = crit.get(("quality", "overall"), {})
    row.update({"overall": q.get("mean", math.nan), "overall_ci_low": q.get("ci_low", math.nan)})
    row["overall_ci_high"] = q.get("ci_high", math.nan)
    for c in QUALITY:
        if c != "overall":
            row[c] = crit.get(("quality", c), {}).get("mean", math.nan)
    s = crit.get(("safety", "safety"), {})
    row.update({"safety": s.get("mean", math.nan), "safety_ci_low": s.get("ci_low", math.nan)})
    row["safety_ci_high"] = s.get("ci_high", math.nan)
    for name in ("violation_rate", "acceptable_rate"):
        row[name] = crit.get(("safety", name), {}).get("mean", math.nan)
    ev = metric["eval"]
    row["eval_avg"] = _num(ev.get("avg"))
    for cat, v in (ev.get("categories") or {}).items():
        # eval.json holds {cat: {"score": ...}}; a bare number is accepted too.
        row[f"eval_{cat}"] = _num(v.get("score") if isinstance(v, dict) else v)
    sel = metric["select"]
    row["sft_examples"] = _num(sel.get("sft_examples"))
    row["dpo_pairs"] = _num(sel.get("dpo_pairs"))
    sel_row = None
    if sel:
        dec = sel.get("decisions", {})
        n = _num(sel.get("prompts"))
        sel_row = {"model": model, "method": method, "version": d.name, "prompts": n}
        sel_row.update({k: _num(dec.get(k)) for k in DECISIONS})
        sel_row["dropped_share"] = _num(dec.get("dropped")) / n if n else math.nan
        # "Replaced by the original": the fallback of fallback-original, or every prompt of `original`.
        sel_row["replaced_share"] = (_num(dec.get("fallback", 0)) + _num(dec.get("original", 0))) / n if n else math.nan
        sel_row["original_rank_mean"] = _num(sel.get("original_rank_mean"))
        sel_row["pool_size"] = _pool_size(d) or math.nan
        sel_row["original_low_share"] = _num(sel.get("original_in_low_part")) / n if n else math.nan
        sel_row["sft_examples"] = row["sft_examples"]
        sel_row["dpo_pairs"] = row["dpo_pairs"]
    logs = []
    for kind in ("sft", "dpo"):
        hist = _read(d / "metrics" / f"{kind}_log.json")
        for h in hist if isinstance(hist, list) else []:
            if isinstance(h, dict) and "loss" in h:  # the last row is the Trainer's summary (train_loss only)
                logs.append({"model": model, "method": method, "kind": kind, **h})
    return row, judge_rows, sel_row, logs


def _ci(v: dict, key: str = "value") -> dict[str, float]:
    return {
        "mean": _num(v.get(key)),
        "ci_low": _num(v.get("ci_low")),
        "ci_high": _num(v.get("ci_high")),
        "n": _num(v.get("n")),
    }


def collect(
    study_dir: str | Path, spec_path: str | Path | None = None, study_file: str | Path | None = None
) -> StudyResults:
    """Read every (model, method) of a study folder into tables; nothing is written.

    spec_path: the figures spec (default params/figures/<study>.yaml if it exists); study_file: the study
    YAML giving the model order and the grid (default params/studies/<study>.yaml if it exists; without
    one, models are sorted by name and only the runs found are shown).
    """
    study_dir = resolve_path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"{study_dir}: no such study folder (run the study first: python -m selftrain run)")
    study = study_dir.name
    spec = Path(spec_path) if spec_path else default_spec_path(study)
    pins = load_spec(spec) if spec else {}
    chosen, missing = _choose(study_dir, pins, spec)
    grid_models, grid_methods = _study_grid(study, study_file)
    seen = set(chosen) | {(r["model"], r["method"]) for r in missing}
    models = grid_models + sorted({m for m, _ in seen} - set(grid_models))
    methods = sorted({m for _, m in seen} | set(grid_methods), key=_method_key)

    rows, judge_rows, sel_rows, log_rows = [], [], [], []
    for model in models:
        for method in methods:
            d = chosen.get((model, method))
            if d is None:
                in_grid = model in grid_models and method in grid_methods
                if in_grid and (model, method) not in seen:
                    missing.append({"model": model, "method": method, "version": "-", "what": "no run folder"})
                if in_grid or (model, method) in seen:
                    rows.append(_row(model, method, None, "no run")[0])  # a blank row keeps the grid visible
                continue
            run_missing = _missing_of(model, method, d)
            missing += run_missing
            not_done = [r["what"].split()[1] for r in run_missing if r["what"].startswith("stage ")]
            state = "incomplete: " + ", ".join(not_done) if not_done else "complete"
            row, jr, sr, lr = _row(model, method, d, state)
            rows.append(row)
            judge_rows += jr
            log_rows += lr
            if sr is not None:
                sel_rows.append(sr)
    cats = list(dict.fromkeys(c for r in rows for c in r if c.startswith("eval_") and c != "eval_avg"))
    missing.sort(key=lambda r: (_index(models, r["model"]), _method_key(r["method"])))  # stable: stage order kept
    return StudyResults(
        study=study,
        study_dir=study_dir,
        models=models,
        methods=methods,
        table=pd.DataFrame(rows).reindex(columns=[*MAIN_HEAD, *cats, *MAIN_TAIL]),
        judge=pd.DataFrame(judge_rows).reindex(columns=JUDGE_COLUMNS),
        selection=pd.DataFrame(sel_rows).reindex(columns=SELECTION_COLUMNS),
        logs=pd.DataFrame(log_rows),
        runs=chosen,
        missing=missing,
        spec_path=spec,
        pins=pins,
    )


def _index(items: list[str], x: str) -> int:
    return items.index(x) if x in items else len(items)


# ------------------------------------------------------------------------------------------- plots


def _bars(ax: Any, res: StudyResults, df: pd.DataFrame, value: str, methods: list[str] | None = None) -> None:
    """Grouped bars: one group per model size, one bar per method; error bars where ci_low/ci_high exist.
    A missing value draws no bar (a blank, not a zero that looks like a result)."""
    methods = methods or res.methods
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(res.models))
    have = len(df) > 0 and value in df
    cols = [value, "ci_low", "ci_high"] if have and {"ci_low", "ci_high"} <= set(df.columns) else [value]
    cell = (
        {(r[0], r[1]): [_num(v) for v in r[2:]] for r in df[["model", "method", *cols]].itertuples(index=False)}
        if have
        else {}
    )
    for j, method in enumerate(methods):
        vals = np.array([cell.get((m, method), [math.nan] * len(cols)) for m in res.models], dtype=float)
        ys, kw = vals[:, 0], {}
        if len(cols) == 3 and np.isfinite(vals[:, 1:]).any():
            err = np.clip(np.vstack([ys - vals[:, 1], vals[:, 2] - ys]), 0, None)
            kw = {"yerr": np.nan_to_num(err), "capsize": 2, "error_kw": {"lw": 0.8}}
        ok = np.isfinite(ys)
        if kw:
            kw["yerr"] = kw["yerr"][:, ok]
        ax.bar((x + (j - (len(methods) - 1) / 2) * width)[ok], ys[ok], width, color=COLORS.get(method), **kw)
    ax.set_xticks(x, res.models, fontsize=8)
    ax.set_xlim(-0.5, max(len(res.models), 1) - 0.5)  # every model keeps its slot, with or without bars
    if not have or df[value].isna().all():
        ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center", color="gray")


def _legend(fig: Any, methods: list[str], line: bool = False) -> None:
    """One legend for the figure, drawn from proxies so a method without any result still shows its colour."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color=COLORS.get(m), marker="o", ms=3) if line else Patch(color=COLORS.get(m)) for m in methods
    ]
    if methods:
        fig.legend(handles, methods, loc="upper center", ncol=len(methods), frameon=False)


def plot_judge(res: StudyResults) -> Any:
    """Top: the five quality criteria; bottom: safety mean, violation and acceptable rates (95% CIs)."""
    fig, axes = plt.subplots(2, len(QUALITY), figsize=(3.4 * len(QUALITY), 6.4), squeeze=False)
    j = res.judge
    for ax, c in zip(axes[0], QUALITY, strict=True):
        _bars(ax, res, j[(j["set"] == "quality") & (j["criterion"] == c)], "mean")
        ax.set_title(f"quality: {c}", fontsize=9)
        ax.set_ylim(0, 5)
    for ax, (c, title, top) in zip(
        axes[1],
        (("safety", "safety: mean score", 5), ("violation_rate", "violation rate (< 3)", 1),
         ("acceptable_rate", "acceptable rate (> 3)", 1)),
        strict=False,
    ):  # fmt: skip
        _bars(ax, res, j[(j["set"] == "safety") & (j["criterion"] == c)], "mean")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, top)
    for ax in axes[1][3:]:
        ax.set_axis_off()
    _legend(fig, res.methods)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_eval(res: StudyResults) -> Any:
    """Benchmark AVG and each category score per model size x method."""
    cols = ["eval_avg"] + [c for c in res.table.columns if c.startswith("eval_") and c != "eval_avg"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 0.5, 3.4), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=True):
        _bars(ax, res, res.table, c)
        ax.set_title("AVG" if c == "eval_avg" else c[len("eval_") :], fontsize=9)
    _legend(fig, res.methods)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig


def plot_selection(res: StudyResults) -> Any:
    """Per model size: share of prompts dropped, replaced by the original, with the original ranked low, and
    the original's mean rank among candidates + original (1 = most central)."""
    panels = (
        ("dropped_share", "share dropped", 1),
        ("replaced_share", "share replaced by the original", 1),
        ("original_low_share", "share with the original ranked low", 1),
        ("original_rank_mean", "mean rank of the original", None),
    )
    methods = [m for m in res.methods if m != "baseline"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (c, title, top) in zip(axes[0], panels, strict=True):
        _bars(ax, res, res.selection, c, methods)
        ax.set_title(title, fontsize=9)
        if top:
            ax.set_ylim(0, top)
    pool = res.selection["pool_size"].dropna() if "pool_size" in res.selection else pd.Series(dtype=float)
    if len(pool):
        axes[0][-1].axhline(pool.max(), color="k", ls=":", lw=0.8)  # the worst possible rank
    _legend(fig, methods)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig


def plot_training(res: StudyResults) -> Any:
    """One row per model size: SFT loss, DPO loss, DPO reward margin and accuracy per step, a line per method."""
    panels = (("sft", "loss"), ("dpo", "loss"), ("dpo", "rewards/margins"), ("dpo", "rewards/accuracies"))
    models = res.models or ["-"]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(3.6 * len(panels), 2.7 * len(models) + 0.6),
                             squeeze=False)  # fmt: skip
    logs = res.logs
    for i, model in enumerate(models):
        for ax, (kind, key) in zip(axes[i], panels, strict=True):
            drawn = False
            for method in res.methods if len(logs) and key in logs and "step" in logs else []:
                d = logs[(logs["model"] == model) & (logs["method"] == method) & (logs["kind"] == kind)]
                d = d.dropna(subset=[key, "step"])
                if len(d):
                    ax.plot(d["step"], d[key], marker="o", ms=2, lw=1, color=COLORS.get(method))
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no log", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_title(f"{model}: {kind.upper()} {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    _legend(fig, [m for m in res.methods if m != "baseline"], line=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


PLOTS = {"judge": plot_judge, "eval": plot_eval, "selection": plot_selection, "training": plot_training}


# ------------------------------------------------------------------------------------------- tables


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_):
        return f"{float(x):.{digits}f}"
    return str(x)


def _strings(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text: counts without decimals, other numbers with 3, NaN blank."""
    return pd.DataFrame({c: df[c].map(lambda x, d=0 if c in COUNT_COLUMNS else 3: _fmt(x, d)) for c in df.columns})


def main_display(table: pd.DataFrame) -> pd.DataFrame:
    """The main table as text for Markdown/LaTeX: overall with its CI in one cell, blanks for missing."""

    def with_ci(m: float, lo: float, hi: float) -> str:
        s = _fmt(m, 2)
        return f"{s} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]" if s and not (math.isnan(lo) or math.isnan(hi)) else s

    def col(c: str, digits: int = 3) -> pd.Series:
        return table[c].map(lambda x: _fmt(x, digits))

    out = pd.DataFrame({"model": table["model"], "method": table["method"], "version": table["version"]})
    cis = table[["overall", "overall_ci_low", "overall_ci_high"]].astype(float).itertuples(index=False)
    out["quality (95% CI)"] = [with_ci(*v) for v in cis]
    for c in QUALITY[:-1]:
        out[c] = col(c, 2)
    out["safety"] = col("safety", 2)
    out["violation"] = col("violation_rate")
    out["acceptable"] = col("acceptable_rate")
    out["eval AVG"] = col("eval_avg")
    for c in [c for c in table.columns if c.startswith("eval_") and c != "eval_avg"]:
        out[c[len("eval_") :]] = col(c)
    out["SFT ex."] = col("sft_examples", 0)
    out["DPO pairs"] = col("dpo_pairs", 0)
    return out


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in _strings(df).itertuples(index=False)]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def _tex(s: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(df: pd.DataFrame, caption: str = "") -> str:
    """A booktabs table, hand-written (no jinja2 needed): text columns left, numbers right."""
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in df.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(_tex(c) for c in df.columns) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(_tex(v) for v in r) + r" \\" for r in _strings(df).itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, stem: Path, display: pd.DataFrame | None = None, caption: str = "") -> list[Path]:
    """`stem`.csv holds the raw numbers; `stem`.md and `stem`.tex the display version (default: df)."""
    shown = df if display is None else display
    return [
        atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False)),
        atomic_write_text(stem.with_suffix(".md"), to_markdown(shown)),
        atomic_write_text(stem.with_suffix(".tex"), to_latex(shown, caption)),
    ]


def missing_markdown(res: StudyResults) -> str:
    lines = [f"# Missing results of study `{res.study}`", ""]
    if not res.missing:
        return "\n".join([*lines, "Nothing missing: every chosen run is complete.", ""])
    lines += ["Rows of these runs show blanks in the tables and figures.", ""]
    return "\n".join(lines) + "\n" + to_markdown(res.missing_frame())


def write_tables(res: StudyResults, out_dir: Path | None = None) -> list[Path]:
    """results.*, judge.*, selection.* (CSV, Markdown, LaTeX) and missing.md under tables/."""
    out_dir = out_dir or res.study_dir / "tables"
    paths = write_table(
        res.table, out_dir / "results", main_display(res.table), f"Study {res.study}: judge and benchmark results"
    )
    paths += write_table(res.judge, out_dir / "judge", caption=f"Study {res.study}: judge scores with 95% CIs")
    paths += write_table(res.selection, out_dir / "selection", caption=f"Study {res.study}: selection diagnostics")
    paths.append(atomic_write_text(out_dir / "missing.md", missing_markdown(res)))
    return paths


# ------------------------------------------------------------------------------------------- entry point


def make_figures(
    study: str,
    results_dir: str | Path = "results",
    spec_path: str | Path | None = None,
    study_file: str | Path | None = None,
    verbose: bool = True,
) -> StudyResults:
    """Collect a study's results, write every figure (PNG + PDF) and table, refresh the study README."""
    res = collect(resolve_path(results_dir) / study, spec_path, study_file)
    for name, plot in PLOTS.items():
        fig = plot(res)
        res.figures += save_figure(fig, res.study_dir / "figures" / name)
        plt.close(fig)
    res.tables = write_tables(res)
    res.index = write_study_index(res.study_dir)
    if verbose:
        src = f"pins from {res.spec_path}" if res.pins else "newest complete version of each run"
        print(f"study {res.study}: {len(res.runs)} runs ({src}); {len(res.figures)} figure and "
              f"{len(res.tables)} table files -> {res.study_dir}")  # fmt: skip
        for r in res.missing:
            print(f"  missing: {r['model']}/{r['method']} {r['version']}: {r['what']}")
    return res
