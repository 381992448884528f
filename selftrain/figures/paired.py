"""Stage 07, paired: each method minus the baseline on the same items, and answer length.

Paired differences (``tables/paired.*``, ``figures/paired``): for every model, every method's run is set against
the baseline's run of the same model (the plain run folders: the params' own seed) on the items both scored:
judge quality (overall) and safety per judge item, benchmark exact match per benchmark sample (datasets
whose samples carry one) and, where stage 06 drew k sampled answers (eval.sampled.k), the share of them that are
right per sample (``eval_sampled``). Per (model, method, metric): the mean difference, its paired bootstrap 95%
interval, a sign-flip permutation p-value, and that p-value Holm-adjusted across the methods of the same model and
metric. Differences inside the per-method intervals of the main table can still be told apart here, since
what both runs share (the item's difficulty) cancels.

Length (``tables/length.*``, ``figures/length``): mean characters of the answers the judge scored, the quality
mean, and a length-controlled quality mean (``selftrain.stats.length_controlled_means``: one slope of score on
length fitted over every method of a model, each method's mean taken at the common mean length). Judges and
MBR selection both favour long answers; a method whose lead vanishes here won on length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain.figures.collect import StudyResults, point_runs, with_sweep
from selftrain.figures.plots import COLORS
from selftrain.io import DataError, read_jsonl
from selftrain.plotting import plt
from selftrain.schema import CONTROLS
from selftrain.stats import holm, length_controlled_means, paired_bootstrap, permutation_p

PAIRED_COLUMNS = ["model", "method", "metric", "items", "difference", "ci_low", "ci_high", "p", "p_holm"]
LENGTH_COLUMNS = ["model", "method", "items", "answer_chars", "quality", "quality_length_controlled"]
# eval_sampled: the share of a benchmark sample's k sampled answers that are right (eval.sampled.k > 0 only).
METRICS = ("quality", "safety", "eval_exact", "eval_sampled")
ALWAYS = ("quality", "safety", "eval_exact")  # listed even where no run scored them (the tables' long-standing shape)


def _items(d: Path | None, name: str) -> list[dict[str, Any]]:
    try:
        return read_jsonl(d / "data" / name) if d is not None and (d / "data" / name).is_file() else []
    except DataError:
        return []


def item_scores(d: Path | None) -> dict[str, dict[Any, float]]:
    """Per-item scores of one run: {metric: {item key: score}} for METRICS."""
    out: dict[str, dict[Any, float]] = {m: {} for m in METRICS}
    for it in _items(d, "judge_items.jsonl"):
        key = "overall" if it.get("set") == "quality" else "safety"
        v = (it.get("scores") or {}).get(key)
        if isinstance(v, int | float):
            out["quality" if key == "overall" else "safety"][it.get("id")] = float(v)
    for r in _items(d, "eval_predictions.jsonl"):
        pair = (r.get("dataset"), r.get("index"))
        if isinstance(r.get("exact"), bool):
            out["eval_exact"][pair] = float(r["exact"])
        if isinstance(r.get("sampled_exact"), int | float) and not isinstance(r.get("sampled_exact"), bool):
            out["eval_sampled"][pair] = float(r["sampled_exact"])
    return out


def differences(a: dict[Any, float], b: dict[Any, float]) -> np.ndarray:
    """`a` minus `b` on the items both scored, in `b`'s order."""
    return np.array([a[k] - b[k] for k in b if k in a])


def comparisons(
    res: StudyResults, baseline: str = "baseline", methods: list[str] | None = None
) -> list[tuple[str, str, list[tuple[str, str, np.ndarray]]]]:
    """Every family of paired comparisons: (model, metric, [(method, sweep label, per-item differences of that
    method's plain run minus `baseline`'s)]), for each model with a `baseline` run and each metric some run of it
    scored (the first three always), methods in `methods` (default all) order, each sweep point of them."""
    out = []
    for model in res.models:
        if (model, baseline) not in res.runs:
            continue  # nothing to pair against
        base = item_scores(res.runs[(model, baseline)])
        others = [(method, label, item_scores(d)) for method in methods or res.methods if method != baseline
                  for label, d in point_runs(res, model, method)]  # fmt: skip
        for metric in METRICS:
            if metric not in ALWAYS and not (base[metric] or any(o[metric] for _, _, o in others)):
                continue
            out.append((model, metric, [(m, label, differences(o[metric], base[metric])) for m, label, o in others]))
    return out


def paired_table(res: StudyResults, baseline: str = "baseline", methods: list[str] | None = None) -> pd.DataFrame:
    """Each method (of `methods`, default all; each sweep point of it) minus `baseline`'s plain run on the items
    both scored; Holm across them per model and metric."""
    rows = []
    for model, metric, family in comparisons(res, baseline, methods):
        block: list[dict[str, Any]] = []
        for method, label, diff in family:
            mean, lo, hi = paired_bootstrap(diff)
            block.append({"model": model, "method": method, "sweep": label, "metric": metric, "items": len(diff),
                          "difference": mean, "ci_low": lo, "ci_high": hi, "p": permutation_p(diff)})  # fmt: skip
        for r, adj in zip(block, holm([r["p"] for r in block]), strict=True):
            r["p_holm"] = adj
        rows += block
    return pd.DataFrame(rows).reindex(columns=with_sweep(PAIRED_COLUMNS, rows))


def controls_table(res: StudyResults) -> pd.DataFrame:
    """Each control arm minus `central` on shared items: does "most central" beat a pick without a utility?
    Empty unless the study has `central` and a control arm."""
    controls = [m for m in res.methods if m in CONTROLS]
    if "central" not in res.methods or not controls:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    return paired_table(res, "central", controls)


def quality_points(d: Path | None) -> list[tuple[int, float]]:
    """(answer characters, judge quality overall) of every scored quality item of one run."""
    out = []
    for it in _items(d, "judge_items.jsonl"):
        v = (it.get("scores") or {}).get("overall")
        if it.get("set") == "quality" and isinstance(v, int | float):
            out.append((len(it.get("answer") or ""), float(v)))
    return out


def length_table(res: StudyResults) -> pd.DataFrame:
    rows = []
    for model in res.models:
        s, n, g = [], [], []
        runs = [(method, label, d) for method in res.methods for label, d in point_runs(res, model, method)]
        for method, label, d in runs:
            for chars, score in quality_points(d):
                s.append(score)
                n.append(chars)
                g.append(f"{method}@{label}")
        adj = length_controlled_means(np.array(s), np.array(n), np.array(g)) if s else {}
        for method, label, _ in runs:
            mine = [i for i, x in enumerate(g) if x == f"{method}@{label}"]
            rows.append({
                "model": model, "method": method, "sweep": label, "items": len(mine),
                "answer_chars": float(np.mean([n[i] for i in mine])) if mine else math.nan,
                "quality": float(np.mean([s[i] for i in mine])) if mine else math.nan,
                "quality_length_controlled": adj.get(f"{method}@{label}", math.nan),
            })  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=with_sweep(LENGTH_COLUMNS, rows))


def plot_paired(res: StudyResults) -> Any:
    """A forest plot per metric: each method minus the baseline with its paired 95% interval, one row per
    (model, method); Holm-adjusted p on the right. Metrics no pair scored get no panel (the tables keep their
    rows), unless none has items: then the usual three panels say so."""
    t = res.paired
    scored = [m for m in METRICS if len(t) and (t[t["metric"] == m]["items"] > 0).any()]
    shown = scored or list(ALWAYS)
    rows = max(((t["metric"] == m).sum() for m in shown), default=0) if len(t) else 0  # a panel's rows
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 0.5 + 0.45 * max(rows, 2)), squeeze=False)
    titles = {"quality": "judge quality (overall)", "safety": "judge safety", "eval_exact": "benchmark exact match",
              "eval_sampled": "sampled exact match"}  # fmt: skip
    for ax, metric in zip(axes[0], shown, strict=True):
        d = t[t["metric"] == metric] if len(t) else t
        labels = []
        for y, r in enumerate(d.itertuples(index=False)):
            ok = not math.isnan(r.difference)
            if ok:
                ax.errorbar(r.difference, y, xerr=[[r.difference - r.ci_low], [r.ci_high - r.difference]], fmt="o",
                            color=COLORS.get(r.method, "k"), ms=4, capsize=2)  # fmt: skip
                ax.annotate(f"p={r.p_holm:.2g}", (1.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="center")
            point = f" {r.sweep}" if "sweep" in d and isinstance(r.sweep, str) and r.sweep else ""
            labels.append(f"{r.model}: {r.method}{point} (n={r.items})")
        ax.axvline(0, color="k", lw=0.8, ls=":")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(-0.7, max(len(labels), 1) - 0.3)
        ax.invert_yaxis()
        ax.set_title(f"{titles[metric]}: method - baseline", fontsize=9)
        if not labels:
            ax.text(0.5, 0.5, "no paired items", transform=ax.transAxes, ha="center", va="center", color="gray")
    fig.tight_layout()
    return fig


def plot_length(res: StudyResults) -> Any:
    """Per model: judge quality against answer length, a dot per item and method, and the pooled slope. None for a
    study none of whose runs has judge scores (StudyResults.judged)."""
    if not res.judged:
        return None
    models = res.models or ["-"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        xs: list[float] = []
        ys: list[float] = []
        for method in res.methods:
            for label, d in point_runs(res, model, method):
                pts = quality_points(d)
                if pts:
                    x, y = zip(*pts, strict=True)
                    name = f"{method} {label}".strip()
                    ax.scatter(x, y, s=8, alpha=0.7, color=None if label else COLORS.get(method), label=name)
                    xs += x
                    ys += y
        if len(xs) >= 3 and np.std(xs) > 0:
            b, a = np.polyfit(xs, ys, 1)
            grid = np.linspace(min(xs), max(xs), 2)
            ax.plot(grid, a + b * grid, color="k", lw=0.8, ls="--")
        else:
            ax.text(0.5, 0.5, "no scored answers", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xlabel("answer length (characters)", fontsize=8)
        ax.set_ylabel("judge quality (overall)", fontsize=8)
        ax.set_title(model, fontsize=9)
    if any(ax.collections for ax in axes[0]):
        axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
