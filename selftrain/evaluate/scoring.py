"""A dataset's scores, category scores and AVG, as llm-jp-eval computes them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from selftrain.evaluate.datasets import Dataset
from selftrain.evaluate.metrics import METRICS, MetricUnavailable, out_of_label_rate, prepare_prediction, score

# Metrics reported on 0-100 (as sacrebleu does); divided by 100 for the 0-1 dataset score that
# categories average, so one BLEU dataset does not outweigh a category of accuracies.
PERCENT_METRICS = {"bleu_en", "bleu_ja"}


def score_dataset(
    dataset: Dataset,
    preds: Sequence[str],
    golds: Sequence[str],
    main: str | None = None,
    inputs: Sequence[str] | None = None,
    prepared: bool = False,
    comet_device: str = "auto",
    unconfirmed: str | None = None,
) -> dict[str, Any]:
    """Every implemented metric of the dataset, its main score (0-1), and the answer-format rates.

    `main`: the metric the category averages (a protocol's map; default the file's first implemented one).
    prepared=True: `preds` are the protocol's extracted answers and `golds` normalised. A main metric that
    cannot run here (not implemented, package or model missing) makes the dataset "not comparable": no
    score, the reason recorded, never another metric under its name. `unconfirmed`: why the protocol's version of
    the main metric is not confirmed; the dataset keeps its score but is marked not comparable with that reason.
    comet_device: where COMET runs (cpu | auto)."""
    main = main or dataset.main_metric
    wanted = list(dict.fromkeys([*dataset.scored_metrics, *([main] if main in METRICS else [])]))
    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for m in wanted:
        try:
            values[m] = float(score(m, preds, golds, prepared=prepared, inputs=inputs, comet_device=comet_device))
        except MetricUnavailable as e:
            unavailable[m] = str(e)
    reason = None
    if main is None or main not in METRICS:
        reason = f"main metric {main!r} is not implemented here"
    elif main in unavailable:
        reason = unavailable[main]
    main_score = values.get(main) if main is not None and reason is None else None
    rate_preds = preds if prepared else [prepare_prediction(p) for p in preds]
    return {
        "samples": len(preds),
        "main_metric": main,
        "main_score": main_score,
        "score": None if main_score is None else main_score / 100 if main in PERCENT_METRICS else main_score,
        "comparable": reason is None and unconfirmed is None,
        "not_comparable_reason": reason or unconfirmed,
        # Small models often answer outside the label set; that is most of their error on label tasks.
        "out_of_label_rate": out_of_label_rate(rate_preds, set(dataset.label_list)) if dataset.label_list else None,
        "empty_rate": out_of_label_rate(rate_preds, set()),  # share of answers that are empty once extracted
        "metrics": values,
        "unsupported_metrics": [m for m in dataset.metrics if m not in METRICS or m in unavailable],
    }


def category_of(name: str, categories: Mapping[str, Sequence[str]]) -> str:
    cats = [c for c, names in categories.items() if name in names]
    return "/".join(cats) if cats else "-"


def aggregate(
    scores: pd.DataFrame | Mapping[str, float],
    categories: Mapping[str, Sequence[str]],
    avg_excludes: Sequence[str],
    empty_category: str = "skip",
    not_comparable: Sequence[str] | Mapping[str, str] = (),
    unconfirmed: Mapping[str, str] | None = None,
    no_avg_reason: str | None = None,
) -> dict[str, Any]:
    """Category scores (mean of their datasets' scores) and AVG (mean of the category scores).

    `scores`: a table with `dataset` and `score` columns, or a dataset -> score mapping; NaN/None count as
    missing. A category with some datasets missing is the mean of those present (listed under "missing").
    One with none: empty_category "skip" leaves it out of AVG; "zero" (llm-jp-eval v1.3) scores it 0.0 and
    counts it. A category whose only datasets are `not_comparable` (a metric that cannot run here; a mapping
    gives each one's reason) has no score and is left out of AVG under either rule, and AVG is flagged not
    comparable. `unconfirmed` datasets (dataset -> why its metric is not confirmed for the version) keep their
    score and count, but flag AVG not comparable while their category counts. `no_avg_reason`: the protocol has
    no category definition here, so no AVG (null, not comparable, that reason). `avg_excludes` never count.
    Datasets in no category are listed under "uncategorised". "avg_not_comparable" lists every reason AVG is not
    the version's.
    """
    if isinstance(scores, pd.DataFrame):
        table = dict(zip(scores["dataset"], scores["score"], strict=True))
    else:
        table = dict(scores)
    present = {k: float(v) for k, v in table.items() if v is not None and not math.isnan(float(v))}
    blocked = dict(not_comparable) if isinstance(not_comparable, Mapping) else dict.fromkeys(not_comparable, "")
    unsure = dict(unconfirmed or {})
    cats: dict[str, dict[str, Any]] = {}
    for cat, names in categories.items():
        have = [n for n in names if n in present]
        nc = [n for n in names if n in blocked]
        value = sum(present[n] for n in have) / len(have) if have else None
        if value is None and empty_category == "zero" and not nc:
            value = 0.0
        cats[cat] = {
            "score": value,
            "datasets": have,
            "missing": [n for n in names if n not in present and n not in blocked],
            "not_comparable": nc,
            "unconfirmed": [n for n in have if n in unsure],
        }
    in_avg = [c for c, v in cats.items() if v["score"] is not None and c not in avg_excludes]
    listed = {n for names in categories.values() for n in names}
    counted = [c for c in cats if c not in avg_excludes]
    reasons = [f"{c}: {n} could not be scored here{': ' + blocked[n] if blocked[n] else ''}"
               for c in counted for n in cats[c]["not_comparable"]]  # fmt: skip
    reasons += [f"{c}: {n}: {unsure[n]}" for c in in_avg for n in cats[c]["unconfirmed"]]
    if no_avg_reason:
        reasons.append(no_avg_reason)
    return {
        "categories": cats,
        "avg": sum(cats[c]["score"] for c in in_avg) / len(in_avg) if in_avg and not no_avg_reason else None,
        "avg_categories": in_avg,
        "avg_excludes": [c for c in avg_excludes if c in cats],
        # AVG is comparable across runs only when every category it should cover has all its datasets.
        "avg_complete": all(not v["missing"] for c, v in cats.items() if c not in avg_excludes),
        # Comparable with the version's published AVG only when no category it covers lost a dataset to a
        # metric that could not run, none counts a metric unconfirmed for the version, and there is an AVG at all.
        "avg_comparable": not reasons,
        "avg_not_comparable": reasons,
        "uncategorised": sorted(n for n in present if n not in listed),
    }
