"""Stage 07, power: how large a difference each paired comparison could have seen, and what a named one needs.

For every paired comparison of the study (each method minus the baseline: ``tables/paired``; each control arm minus
``central``: ``tables/controls``) and metric, from the per-item differences of the plain runs on shared items:

* ``sd``: their standard deviation (ddof 1), ``items`` how many, ``observed`` their mean;
* ``alpha``: the level Holm's step-down compared this comparison's p-value with, at a family-wise
  ``figures.power.alpha`` (0.05): alpha / (m - rank of its p) in its family (``family`` = m: the comparisons of one
  model, reference arm and metric, as the paired tables adjust them);
* ``mdd``: the minimum detectable difference at ``figures.power.power`` (80%) and that level (a two-sided paired t
  test on the items: ``selftrain.stats``);
* ``named``: the difference the study names for the metric (``figures.power.difference`` in
  ``params/figures/<study>.yaml``), ``items_needed`` the items that detect it at that level, power and ``sd``;
* with replicate seeds (``study.seeds``): ``seeds`` and ``seed_sd``, the standard deviation across seeds of the
  per-seed mean difference (each seed's run of the method minus the reference arm's run at the same seed), and
  ``seeds_needed`` for the named difference from that spread (a paired t test over seeds).

``python -m selftrain power`` prints the same table before a study runs (selftrain.cli.power), from a pilot's
results or given standard deviations, at Bonferroni's alpha / m (Holm's first and strictest step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain.config import FiguresPower, load_figures_power
from selftrain.figures.collect import StudyResults, with_sweep
from selftrain.figures.paired import comparisons, differences, item_scores
from selftrain.schema import CONTROLS, folder_sweep, split_run_folder
from selftrain.stats import holm_levels, items_needed, min_detectable_difference

POWER_COLUMNS = [
    "model", "method", "sweep", "versus", "metric", "items", "observed", "sd", "family", "alpha", "mdd", "named",
    "items_needed", "seeds", "seed_sd", "seeds_needed",
]  # fmt: skip


def _sd(values: np.ndarray | list[float]) -> float:
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) >= 2 else math.nan


def seed_differences(res: StudyResults, model: str, method: str, label: str, versus: str, metric: str) -> list[float]:
    """Per replicate seed: the mean over shared items of `method`'s run (at sweep point `label`) minus `versus`'s
    plain run at the same seed (the plain folders pair with each other: the params' own seed)."""
    runs: dict[tuple[str, str, int | None], Path] = {}
    for (m, folder), d in res.runs.items():
        if m == model:
            name, seed = split_run_folder(folder)
            runs[(name, folder_sweep(folder), seed)] = d
    out = []
    for (name, lab, seed), d in runs.items():
        ref = runs.get((versus, "", seed))
        if name != method or lab != label or ref is None:
            continue
        diff = differences(item_scores(d)[metric], item_scores(ref)[metric])
        if len(diff):
            out.append(float(diff.mean()))
    return out


def power_row(row: dict[str, Any], settings: FiguresPower) -> dict[str, Any]:
    """The derived columns of one comparison: mdd at its `alpha`, items and seeds needed for its `named` difference."""
    alpha, power = row["alpha"], settings.power
    row["mdd"] = min_detectable_difference(row["sd"], row["items"], alpha, power)
    row["items_needed"] = items_needed(row["named"], row["sd"], alpha, power)
    row["seeds_needed"] = items_needed(row["named"], row["seed_sd"], alpha, power)
    return row


def power_table(res: StudyResults, settings: FiguresPower | None = None) -> pd.DataFrame:
    """One row per paired comparison (the rows of res.paired, then of res.controls) and metric with shared items;
    empty for a study without a baseline or control arms. `settings`: figures.power (default: the figures spec's)."""
    settings = settings or load_figures_power(res.spec_path)
    rows = []
    controls = [m for m in res.methods if m in CONTROLS]
    plans: list[tuple[str, list[str] | None, pd.DataFrame | None]] = [("baseline", None, res.paired)]
    if "central" in res.methods and controls:
        plans.append(("central", controls, res.controls))
    for versus, methods, table in plans:
        if table is None or not len(table):
            continue
        for model, metric, family in comparisons(res, versus, methods):
            p = []
            for method, label, _ in family:  # the p-values Holm adjusted, from the paired table itself
                hit = table[(table["model"] == model) & (table["method"] == method) & (table["metric"] == metric)]
                if "sweep" in hit:
                    hit = hit[hit["sweep"].fillna("") == label]
                p.append(float(hit["p"].iloc[0]) if len(hit) else math.nan)
            levels = holm_levels(p, settings.alpha)
            for (method, label, diff), alpha in zip(family, levels, strict=True):
                if not len(diff):
                    continue  # a metric this pair never scored on shared items (a study without stage 05)
                seeds = seed_differences(res, model, method, label, versus, metric)
                rows.append(power_row({
                    "model": model, "method": method, "sweep": label, "versus": versus, "metric": metric,
                    "items": len(diff), "observed": float(diff.mean()), "sd": _sd(diff),
                    "family": int(np.sum(~np.isnan(p))), "alpha": alpha,
                    "named": settings.difference_for(metric),
                    "seeds": len(seeds), "seed_sd": _sd(seeds),
                }, settings))  # fmt: skip
    return whole_counts(pd.DataFrame(rows).reindex(columns=with_sweep(POWER_COLUMNS, rows)))


COUNT_COLUMNS = ("items_needed", "seeds_needed")


def whole_counts(table: pd.DataFrame) -> pd.DataFrame:
    """items_needed and seeds_needed as whole numbers with blanks where there is no answer: a float column (one NaN
    is enough) wrote 8.0 seeds into the CSV."""
    for col in COUNT_COLUMNS:
        if col in table:
            table[col] = pd.array([None if pd.isna(v) else int(v) for v in table[col]], dtype="Int64")
    return table


def power_display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text for Markdown/LaTeX: the level with four significant digits (0.0125 rather than the
    three decimals of the other numbers)."""
    out = table.copy().astype(object)
    out["alpha"] = [f"{a:.4g}" if isinstance(a, float) and not math.isnan(a) else "" for a in table["alpha"]]
    for col in COUNT_COLUMNS:  # whole numbers; blank where there is no answer
        if col in out:
            out[col] = ["" if pd.isna(v) else str(int(v)) for v in table[col]]
    return out


def power_markdown_note(settings: FiguresPower) -> str:
    """The lines under the power table that say how to read it."""
    named = ", ".join(f"{k} {v:g}" for k, v in settings.difference.items())
    return (
        f"mdd: the smallest true difference a two-sided paired t test over these items detects with "
        f"{settings.power:.0%} power at `alpha`, the level Holm's step-down compared the comparison's p-value with "
        f"(family-wise {settings.alpha:g}; family = the comparisons Holm adjusts together). items_needed / "
        f"seeds_needed: for the named difference ({named}), from the per-item sd / the across-seed sd of the "
        "per-seed mean difference.\n"
    )
