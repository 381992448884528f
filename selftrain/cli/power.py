"""`python -m selftrain power --study FILE`: stage 07's power table (selftrain.figures.power) before a study runs.

The comparisons are the study's own (each method minus the baseline, each control arm minus ``central``, at every
sweep point), the items its params give (stage 06: the benchmark samples it asks, ``eval.max_samples`` each;
stage 05: the judge sets' items, ``judge.limit`` each), the seeds ``study.seeds``. The standard deviations come
from ``--sd metric=value`` (every comparison of that metric), else from a pilot study's results (``--pilot``, default
the study's own results folder when it has runs): the same comparison's, else the largest the pilot shows for that
metric (said in ``sd_from``). The level is Bonferroni's alpha / m, Holm's first and strictest step: no p-value
exists yet to rank the comparisons by.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import ConfigError, FiguresPower, load_figures_power, load_study, resolve_run_config
from selftrain.paths import project_root, resolve_path
from selftrain.schema import CONTROLS, sweep_label

PLAN_COLUMNS = ["model", "method", "sweep", "versus", "metric", "items", "sd", "sd_from", "family", "alpha", "mdd",
                "named", "items_needed", "seeds", "seed_sd", "seeds_needed"]  # fmt: skip


def parse_pairs(items: list[str] | None, flag: str, metrics: tuple[str, ...], number: type = float) -> dict[str, Any]:
    """['quality=0.3', ...] -> {'quality': 0.3}; every bad item named at once."""
    out, bad = {}, []
    for item in items or []:
        key, _, raw = item.partition("=")
        try:
            value = number(raw)
        except ValueError:
            value = None
        if key not in metrics or value is None or not value > 0:
            bad.append(item)
        else:
            out[key] = value
    if bad:
        raise ConfigError(f"command line: {flag} {' '.join(bad)}: give metric=value with a value above 0 and a metric "
                          f"of {', '.join(metrics)}")  # fmt: skip
    return out


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def planned_items(cfg: Any, metrics: list[str]) -> dict[str, float]:
    """Items each metric pairs on, as the cell's params will ask them (NaN where a set cannot be read here)."""
    from selftrain.evaluate import load_datasets

    out: dict[str, float] = {}
    if {"eval_exact", "eval_sampled"} & set(metrics):
        ev = cfg.eval
        datasets, _ = load_datasets(ev.datasets_dir, ev.datasets)
        cap = ev.max_samples or math.inf
        n = sum(min(len(ds.samples), cap) for ds in datasets)  # stage 06 records `exact` for every sample
        out["eval_exact"] = out["eval_sampled"] = float(n)
    for metric, path in (("quality", cfg.judge.quality_set), ("safety", cfg.judge.safety_set)):
        if metric in metrics:
            p = resolve_path(path)
            n = _lines(p) if cfg.judge.protocol == "own" and p.is_file() else math.nan
            out[metric] = float(min(n, cfg.judge.limit)) if cfg.judge.limit and not math.isnan(n) else float(n)
    return out


def _pilot_table(pilot: Path) -> pd.DataFrame:
    from selftrain.figures import collect, controls_table, paired_table
    from selftrain.figures.power import power_table

    res = collect(pilot)
    res.paired, res.controls = paired_table(res), controls_table(res)
    return power_table(res)


def _from_pilot(table: pd.DataFrame, model: str, method: str, versus: str, metric: str, col: str) -> tuple[float, str]:
    """The pilot's value of `col` for this comparison, else for the same comparison of any model, else the largest
    of the metric; and where it came from."""
    if not len(table):
        return math.nan, ""
    t = table[(table["metric"] == metric) & table[col].notna()]
    same = t[(t["method"] == method) & (t["versus"] == versus)]
    for how, hit in (("same comparison", same[same["model"] == model]), ("same comparison, other model", same)):
        if len(hit):
            return float(hit[col].iloc[0]), f"pilot: {how}"
    return (float(t[col].max()), "pilot: largest of the metric") if len(t) else (math.nan, "")


def plan_power(
    study_path: str | Path,
    pilot: str | Path | None = None,
    sds: dict[str, float] | None = None,
    seed_sds: dict[str, float] | None = None,
    differences: dict[str, float] | None = None,
    items: dict[str, int] | None = None,
) -> tuple[pd.DataFrame, FiguresPower, str]:
    """The power table of a study not yet run: (table, the settings used, where the standard deviations came from)."""
    from selftrain.figures.power import power_row, whole_counts

    study, _, path = load_study(study_path)
    spec = project_root() / "params" / "figures" / f"{study.name}.yaml"
    settings = load_figures_power(spec if spec.is_file() else None)
    if differences:
        settings = FiguresPower(difference={**settings.difference, **differences}, alpha=settings.alpha,
                                power=settings.power)  # fmt: skip
    plans = []
    if "baseline" in study.methods:
        plans += [(m, "baseline") for m in study.methods if m != "baseline"]
    if "central" in study.methods:
        plans += [(m, "central") for m in study.methods if m in CONTROLS]
    if not plans:
        raise ConfigError(f"{path}: no paired comparison: the study has no `baseline` and no control arm beside "
                          "`central`")  # fmt: skip
    cfgs = {model: resolve_run_config(model, plans[0][1], path) for model in study.models}
    sampled = {model for model, cfg in cfgs.items() if "eval" in study.stages and cfg.eval.sampled.k}
    metrics = [*(["quality", "safety"] if "judge" in study.stages else []),
               *(["eval_exact"] if "eval" in study.stages else []), *(["eval_sampled"] if sampled else [])]  # fmt: skip
    table, source = pd.DataFrame(), "given (--sd)"
    if any(m not in (sds or {}) for m in metrics):  # a pilot supplies what was not given
        folder = resolve_path(pilot) if pilot else project_root() / "results" / study.name
        if not folder.is_dir() or not any(folder.glob("*/*/v*")):
            if pilot:
                raise FileNotFoundError(f"{folder}: no run folders to read a pilot's standard deviations from")
            lacking = ", ".join(m for m in metrics if m not in (sds or {}))
            raise ConfigError(f"{path}: no standard deviation for {lacking}: give --sd metric=value or --pilot <a "
                              "study folder with results>")  # fmt: skip
        table, source = _pilot_table(folder), f"pilot {folder}"
    rows = []
    seeds = len(study.seeds) or 1
    for model in study.models:
        model_metrics = [m for m in metrics if m != "eval_sampled" or model in sampled]
        n_items = {**planned_items(cfgs[model], model_metrics), **(items or {})}
        for metric in model_metrics:
            for versus in dict.fromkeys(v for _, v in plans):
                family = [(m, sweep_label(p)) for m, v in plans if v == versus for p in study.points()]
                for method, label in family:
                    sd, sd_from = ((sds or {})[metric], "given") if metric in (sds or {}) else _from_pilot(
                        table, model, method, versus, metric, "sd")  # fmt: skip
                    seed_sd = (seed_sds or {}).get(metric, math.nan)
                    if metric not in (seed_sds or {}):
                        seed_sd = _from_pilot(table, model, method, versus, metric, "seed_sd")[0]
                    rows.append(power_row({
                        "model": model, "method": method, "sweep": label, "versus": versus, "metric": metric,
                        "items": n_items.get(metric, math.nan), "sd": sd, "sd_from": sd_from, "family": len(family),
                        "alpha": settings.alpha / len(family), "named": settings.difference_for(metric),
                        "seeds": seeds, "seed_sd": seed_sd if seeds > 1 or not math.isnan(seed_sd) else math.nan,
                    }, settings))  # fmt: skip
    cols = PLAN_COLUMNS if any(r["sweep"] for r in rows) else [c for c in PLAN_COLUMNS if c != "sweep"]
    return whole_counts(pd.DataFrame(rows).reindex(columns=cols)), settings, source


def power_lines(args: Any) -> list[str]:
    """What `python -m selftrain power` prints."""
    from selftrain.figures.power import power_display
    from selftrain.figures.tables import to_markdown

    names = ("quality", "safety", "eval_exact", "eval_sampled")
    table, settings, source = plan_power(
        args.study, args.pilot, parse_pairs(args.sd, "--sd", names), parse_pairs(args.seed_sd, "--seed-sd", names),
        parse_pairs(args.difference, "--difference", names), parse_pairs(args.items, "--items", names, int),
    )  # fmt: skip
    named = ", ".join(f"{k} {v:g}" for k, v in settings.difference.items())
    head = [
        f"power of {args.study}'s paired comparisons before it runs: {settings.power:.0%} power, two-sided paired t, "
        f"at alpha / family ({settings.alpha:g} family-wise, Bonferroni = Holm's strictest step)",
        f"standard deviations: {source}; named differences: {named}",
        "",
    ]
    return head + to_markdown(power_display(table)).splitlines()
