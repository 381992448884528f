"""Stage 07, plots: the paper's figures from a collected study (grouped bars per model size x method, curves)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from selftrain.figures.collect import StudyResults, _num, _sweep_key, plain_rows, sweep_value
from selftrain.plotting import plt
from selftrain.schema import CONTROLS, METHODS, QUALITY

# One colour per method, fixed, so a method looks the same in every figure (control arms in muted tones).
COLORS = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green"), strict=True))
COLORS.update(zip(CONTROLS, ("tab:olive", "tab:purple", "tab:pink", "tab:brown"), strict=True))


def _bars(
    ax: Any,
    res: StudyResults,
    df: pd.DataFrame,
    value: str,
    methods: list[str] | None = None,
    seeds: pd.DataFrame | None = None,
) -> None:
    """Grouped bars: one group per model size, one bar per method; error bars where ci_low/ci_high exist.
    A missing value draws no bar (a blank, not a zero that looks like a result). seeds: the same rows per
    replicate seed; where a bar stands on two or more seeds, each seed's value is a black dot on it."""
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
            # lists, not a (2, k) array: matplotlib probes an array's first row as a scalar (a numpy deprecation)
            kw["yerr"] = kw["yerr"][:, ok].tolist()
        xs = x + (j - (len(methods) - 1) / 2) * width
        ax.bar(xs[ok], ys[ok], width, color=COLORS.get(method), **kw)
        if seeds is not None and len(seeds) and value in seeds:
            for i, m in enumerate(res.models):
                pts = seeds[(seeds["model"] == m) & (seeds["method"] == method)][value].map(_num).dropna()
                if len(pts) >= 2:
                    ax.scatter([xs[i]] * len(pts), pts, s=6, color="k", zorder=3)
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
    """Top: the five quality criteria; bottom: safety mean, violation and acceptable rates (95% CIs). None for a study
    none of whose runs has judge scores (StudyResults.judged)."""
    if not res.judged:
        return None
    j, js = plain_rows(res.judge), plain_rows(res.judge_replicates)
    fig, axes = plt.subplots(2, len(QUALITY), figsize=(2.8 * len(QUALITY), 5.8), squeeze=False)
    seeds = js if len(js) else None

    def pick(df: pd.DataFrame | None, s: str, c: str) -> pd.DataFrame | None:
        return None if df is None else df[(df["set"] == s) & (df["criterion"] == c)]

    for ax, c in zip(axes[0], QUALITY, strict=True):
        _bars(ax, res, pick(j, "quality", c), "mean", seeds=pick(seeds, "quality", c))
        ax.set_title(f"quality: {c}", fontsize=10)
        ax.set_ylim(0, 5)
    for ax, (c, title, top) in zip(
        axes[1],
        (("safety", "safety: mean score", 5), ("violation_rate", "violation rate (< 3)", 1),
         ("acceptable_rate", "acceptable rate (> 3)", 1)),
        strict=False,
    ):  # fmt: skip
        _bars(ax, res, pick(j, "safety", c), "mean", seeds=pick(seeds, "safety", c))
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, top)
    for ax in axes[1][3:]:
        ax.set_axis_off()
    _legend(fig, res.methods)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def _grid(n: int, ncols: int = 4, w: float = 3.0, h: float = 2.8) -> tuple[Any, list[Any]]:
    """n panels in rows of at most `ncols`, so a figure stays about 12 in wide and its text readable in a
    notebook (a 26-in row of nine categories is scaled to half size, 4-pt text)."""
    ncols = min(ncols, max(n, 1))
    nrows = -(-max(n, 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.6), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def plot_eval(res: StudyResults) -> Any:
    """Benchmark AVG and each category score per model size x method (rows of four panels). Categories no run
    scored are left out (a study of its own categories, as the positive control, has none of llm-jp-eval's)."""
    cats = [c for c in res.table.columns if c.startswith("eval_") and c != "eval_avg"]
    scored = [c for c in cats if res.table[c].notna().any()]
    cols = ["eval_avg"] + (scored or cats)
    fig, axes = _grid(len(cols))
    for ax, c in zip(axes, cols, strict=True):
        _bars(ax, res, plain_rows(res.table), c, seeds=plain_rows(res.replicates))
        ax.set_title("AVG" if c == "eval_avg" else c[len("eval_") :], fontsize=10)
    _legend(fig, res.methods)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
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
        _bars(ax, res, plain_rows(res.selection), c, methods)
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
    logs = plain_rows(res.logs)
    for i, model in enumerate(models):
        for ax, (kind, key) in zip(axes[i], panels, strict=True):
            drawn = False
            for method in res.methods if len(logs) and key in logs and "step" in logs else []:
                d = logs[(logs["model"] == model) & (logs["method"] == method) & (logs["kind"] == kind)]
                d = d.dropna(subset=[key, "step"])
                for _, part in d.groupby(d["seed"].fillna(-1) if "seed" in d else [0] * len(d), sort=True):
                    ax.plot(
                        part["step"], part[key], marker="o", ms=2, lw=1, color=COLORS.get(method)
                    )  # a line per seed
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no log", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_title(f"{model}: {kind.upper()} {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    _legend(fig, [m for m in res.methods if m != "baseline"], line=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def plot_sweep(res: StudyResults) -> Any:
    """Score against each sweep axis (study.sweep, e.g. selection.n): judge quality, safety and benchmark AVG per
    point, a line per (model, method); error bars: the across-seed sd where a point has seeds, else the judge's
    95% interval. None for a study without a sweep."""
    t = res.table[res.table["sweep"].fillna("") != ""] if "sweep" in res.table else res.table.iloc[:0]
    if not len(t):
        return None
    axes_keys = sorted({p.split("=", 1)[0] for label in t["sweep"] for p in label.split("@")})
    panels = (("overall", "seed_sd_overall", "judge quality (overall)"), ("safety", "seed_sd_safety", "judge safety"),
              ("eval_avg", "seed_sd_eval_avg", "benchmark AVG"))  # fmt: skip
    fig, axes = plt.subplots(len(axes_keys), len(panels), figsize=(4.0 * len(panels), 3.2 * len(axes_keys)),
                             squeeze=False)  # fmt: skip
    for i, key in enumerate(axes_keys):
        for ax, (col, sd, title) in zip(axes[i], panels, strict=True):
            for (model, method), d in t.groupby(["model", "method"], sort=False):
                pts = sorted(
                    ((dict(p.split("=", 1) for p in r["sweep"].split("@")).get(key), r) for _, r in d.iterrows()),
                    key=lambda x: _sweep_key(f"{key}={x[0]}"),
                )
                known = [(v, r) for v, r in pts if v is not None]
                if not known:
                    continue
                xs = [sweep_value(v) for v, _ in known]
                ys = [_num(r[col]) for _, r in known]
                err = [_num(r[sd]) if _num(r.get("seeds", 1)) > 1 else math.nan for _, r in known]
                label = f"{model}: {method}" if len(res.models) > 1 else method
                ax.errorbar(xs, ys, yerr=np.nan_to_num(err), marker="o", ms=3, lw=1, capsize=2,
                            color=COLORS.get(method), label=label)  # fmt: skip
            ax.set_xlabel(key, fontsize=8)
            ax.set_title(title, fontsize=9)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


PLOTS = {
    "judge": plot_judge,
    "eval": plot_eval,
    "selection": plot_selection,
    "training": plot_training,
    "sweep": plot_sweep,
}
