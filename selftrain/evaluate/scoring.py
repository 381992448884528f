"""A dataset's scores, category scores and AVG, as llm-jp-eval computes them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from selftrain.evaluate.datasets import Dataset
from selftrain.metrics import out_of_label_rate, score

# Metrics reported on 0-100 (as sacrebleu does); divided by 100 for the 0-1 dataset score that
# categories average, so one BLEU dataset does not outweigh a category of accuracies.
PERCENT_METRICS = {"bleu_en", "bleu_ja"}


def score_dataset(dataset: Dataset, raw: Sequence[str], golds: Sequence[str]) -> dict[str, Any]:
    """Every implemented metric of the dataset, its main score (0-1), and the answer-format rates."""
    values = {m: float(score(m, raw, golds)) for m in dataset.scored_metrics}
    main = dataset.main_metric
    return {
        "samples": len(raw),
        "main_metric": main,
        "main_score": values[main],
        "score": values[main] / 100 if main in PERCENT_METRICS else values[main],
        # Small models often answer outside the label set; that is most of their error on label tasks.
        "out_of_label_rate": out_of_label_rate(raw, set(dataset.label_list)) if dataset.label_list else None,
        "empty_rate": out_of_label_rate(raw, set()),  # share of answers that are empty once prepared
        "metrics": values,
        "unsupported_metrics": dataset.unsupported_metrics,
    }


def category_of(name: str, categories: Mapping[str, Sequence[str]]) -> str:
    cats = [c for c, names in categories.items() if name in names]
    return "/".join(cats) if cats else "-"


def aggregate(
    scores: pd.DataFrame | Mapping[str, float], categories: Mapping[str, Sequence[str]], avg_excludes: Sequence[str]
) -> dict[str, Any]:
    """Category scores (mean of their datasets' scores) and AVG (mean of the category scores).

    `scores`: a table with `dataset` and `score` columns, or a dataset -> score mapping; NaN/None count as
    missing. A category with some datasets missing is the mean of those present (listed under "missing");
    one with none has no score and is left out of AVG, as are `avg_excludes`. Datasets in no category are
    listed under "uncategorised".
    """
    if isinstance(scores, pd.DataFrame):
        table = dict(zip(scores["dataset"], scores["score"], strict=True))
    else:
        table = dict(scores)
    present = {k: float(v) for k, v in table.items() if v is not None and not math.isnan(float(v))}
    cats: dict[str, dict[str, Any]] = {}
    for cat, names in categories.items():
        have = [n for n in names if n in present]
        cats[cat] = {
            "score": sum(present[n] for n in have) / len(have) if have else None,
            "datasets": have,
            "missing": [n for n in names if n not in present],
        }
    in_avg = [c for c, v in cats.items() if v["score"] is not None and c not in avg_excludes]
    listed = {n for names in categories.values() for n in names}
    return {
        "categories": cats,
        "avg": sum(cats[c]["score"] for c in in_avg) / len(in_avg) if in_avg else None,
        "avg_categories": in_avg,
        "avg_excludes": [c for c in avg_excludes if c in cats],
        # AVG is comparable across runs only when every category it should cover has all its datasets.
        "avg_complete": all(not v["missing"] for c, v in cats.items() if c not in avg_excludes),
        "uncategorised": sorted(n for n in present if n not in listed),
    }
