"""Stage 06: an llm-jp-eval-compatible benchmark of the model under test.

Datasets are llm-jp-eval's preprocessed JSON files (one per dataset: ``instruction``, ``output_length``,
``metrics``, ``few_shots``, ``samples`` of ``input``/``output``, optionally ``label_list``). Each sample is
asked with llm-jp-eval v1.3.0's prompt layout::

    {preamble}\\n\\n{instruction marker}\\n{instruction}
    (\\n\\n{input marker}\\n{few-shot input}\\n\\n{response marker}\\n{few-shot output}) x k
    \\n\\n{input marker}\\n{input}\\n\\n{response marker}\\n

decoded greedily up to ``output_length`` new tokens, and scored with :mod:`selftrain.metrics` (llm-jp-eval's
definitions). A dataset's score is its main metric (the first metric its file lists that we implement;
BLEU rescaled from 0-100 to 0-1), a category's score the mean over its datasets, AVG the mean over the
categories (``eval.categories`` / ``eval.avg_excludes``). A malformed dataset file is reported with its path
and field in ``metrics/eval.json`` and the other datasets still run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import EvalConfig, GenerationConfig, ModelConfig
from selftrain.evaluate.datasets import Dataset, dataset_paths, load_datasets
from selftrain.evaluate.prompts import bos_prefix, fit_prompt, token_counter
from selftrain.evaluate.protocols import Protocol, ProtocolError, load_protocol
from selftrain.evaluate.scoring import aggregate, category_of, score_dataset
from selftrain.inference import device, generate_candidates, inference_dtype, pick_backend
from selftrain.io import DataError, read_jsonl, write_json, write_jsonl
from selftrain.paths import resolve_path
from selftrain.plots import plt
from selftrain.runs import Run
from selftrain.schema import read_metrics

STAGE = "eval"


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(
    folder: Path,
    model_cfg: ModelConfig,
    cfg: EvalConfig,
    datasets: Sequence[Dataset],
    backend: str,
    seed: int = 1234,
    progress: bool = True,
    protocol: Protocol | None = None,
) -> tuple[list[dict[str, Any]], pd.DataFrame, dict[str, Any]]:
    """Ask every sample of every dataset in one backend call (the model is loaded once) and score them as the
    protocol says (default: the config's own).

    Returns (per-sample prediction records, per-dataset score table, run facts: timings, prompt examples).
    """
    from transformers import AutoTokenizer

    protocol = protocol or load_protocol(cfg)
    tok = AutoTokenizer.from_pretrained(folder)
    count = token_counter(tok, cfg.chat_template)
    bos = bos_prefix(tok, backend, cfg.chat_template, protocol.add_bos)
    jobs: list[dict[str, Any]] = []
    examples: dict[str, str] = {}
    wanted: dict[str, int] = {}
    for ds in datasets:
        shots = protocol.few_shots(ds)
        wanted[ds.name] = len(shots)
        for i, s in enumerate(ds.samples[: cfg.max_samples]):
            prompt, k, fits = fit_prompt(
                lambda sh, ds=ds, s=s: protocol.prompt(ds, sh, s["input"]),
                shots,
                protocol.max_new_tokens(ds),
                count,
                model_cfg.max_model_len,
                shorten=protocol.own,
            )
            examples.setdefault(ds.name, prompt)
            jobs.append({"ds": ds, "index": i, "sample": s, "prompt": prompt, "few_shots": k, "fits": fits})
    todo = [j for j in jobs if j["fits"]]
    if backend == "transformers":
        # Batches are cut per token cap in list order: sorting by length keeps padding (wasted prefill) small.
        todo.sort(key=lambda j: (j["ds"].output_length, count(j["prompt"])))
    caps = [protocol.max_new_tokens(j["ds"]) for j in todo]
    gen = GenerationConfig(
        backend=backend, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max(caps, default=1), seed=seed,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    t0 = time.perf_counter()
    outs: list[dict[str, Any]] = []
    if todo:
        prompts: list[Any] = (
            [[{"role": "user", "content": j["prompt"]}] for j in todo]
            if cfg.chat_template
            else [bos + j["prompt"] for j in todo]
        )
        outs = generate_candidates(
            folder, model_cfg, gen, prompts, backend, progress, chat=cfg.chat_template, max_new_tokens=caps,
            add_special_tokens=protocol.add_bos,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    for j, o in zip(todo, sorted(outs, key=lambda r: r["prompt_index"]), strict=True):
        j["out"] = o
    records = []
    for j in jobs:
        ds, s, o = j["ds"], j["sample"], j.get("out")
        raw = o["text"] if o else ""  # a prompt too long for the model scores as an empty answer
        pred, gold = protocol.extract(ds, raw), protocol.gold(s["output"])
        records.append(
            {
                "dataset": ds.name,
                "index": j["index"],
                "input": s["input"],
                "gold": s["output"],
                "raw": raw,
                "prediction": pred,
                "exact": pred == gold,
                "in_labels": (pred in {protocol.gold(x) for x in ds.label_list}) if ds.label_list else None,
                "few_shots": j["few_shots"],
                "finish_reason": o["finish_reason"] if o else "too_long",
                "num_tokens": o["num_tokens"] if o else 0,
            }
        )
    rows = []
    for ds in datasets:
        recs = [r for r in records if r["dataset"] == ds.name]
        scored = score_dataset(
            ds,
            [r["prediction"] for r in recs],
            [protocol.gold(r["gold"]) for r in recs],
            main=protocol.main_metric(ds),
            inputs=[r["input"] for r in recs],
            prepared=True,
        )
        row = {"dataset": ds.name, **scored}
        row["few_shots"] = min(r["few_shots"] for r in recs)
        row["few_shots_wanted"] = wanted[ds.name]
        row["shortened"] = sum(r["few_shots"] < wanted[ds.name] for r in recs)
        row["too_long"] = sum(r["finish_reason"] == "too_long" for r in recs)
        rows.append(row)
    facts = {
        "samples": len(records),
        "generated_samples": len(todo),
        "generated_tokens": sum(o["num_tokens"] for o in outs),
        "generation_seconds": round(seconds, 2),  # model load included: one load for every dataset
        "samples_per_second": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
        "prompt_examples": examples,
    }
    return records, pd.DataFrame(rows), facts


def _score_columns(df: pd.DataFrame, categories: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """The per-dataset table as saved in eval_scores.csv: one column per metric, category first."""
    out = df.drop(columns=["metrics", "unsupported_metrics"]).copy()
    out.insert(1, "category", [category_of(n, categories) for n in out["dataset"]])
    metric_names = sorted({m for d in df["metrics"] for m in d})
    for m in metric_names:
        out[m] = [d.get(m) for d in df["metrics"]]
    return out


def _no_nan(row: dict[str, Any]) -> dict[str, Any]:
    # pandas turns None into NaN in numeric columns; JSON has no NaN, so back to null.
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def run(run: Run, progress: bool = True) -> pd.DataFrame:
    """Stage 06 for a run folder: predictions, per-dataset scores, category scores and AVG, one figure."""
    scores_file = run.metrics_dir / "eval_scores.csv"
    if run.is_done(STAGE):
        return pd.read_csv(scores_file)
    cfg = run.config
    ev = cfg.eval
    folder = run.model_under_test()  # M0 for baseline; refuses an unfinished training stage
    files = [p for p in dataset_paths(ev.datasets_dir, ev.datasets) if p.is_file()]
    files += [t for p in files if (t := p.parent.parent / "train" / p.name).is_file()]  # few-shot sources
    with run.stage(STAGE, inputs=files) as info:
        t0 = time.time()
        protocol = load_protocol(ev)
        datasets, errors = load_datasets(ev.datasets_dir, ev.datasets, require_metric=protocol.own)
        bad = []
        for ds in datasets:
            try:
                protocol.check_dataset(ds)
            except ProtocolError as e:
                bad.append(str(e))
        if bad:  # every mismatched file at once, one line each
            raise ProtocolError(f"{len(bad)} dataset file(s) do not match eval.protocol:\n  " + "\n  ".join(bad))
        for e in errors:
            warnings.warn(f"dataset skipped: {e['error']}", stacklevel=2)
        if not datasets:
            raise DataError("no valid benchmark dataset:\n  " + "\n  ".join(e["error"] for e in errors))
        backend = pick_backend(ev.backend)
        info["numerics"] = {"dtype": inference_dtype(cfg.model.dtype, backend), "backend": backend}
        records, table, facts = evaluate(folder, cfg.model, ev, datasets, backend, cfg.seed, progress, protocol)
        categories = protocol.category_names()
        blocked = [r["dataset"] for r in table.to_dict(orient="records") if not r["comparable"]]
        agg = aggregate(table, categories, protocol.avg_excludes, protocol.empty_category, blocked)
        pred_file = run.data_dir / "eval_predictions.jsonl"
        write_jsonl(pred_file, records)
        saved = _score_columns(table, categories)
        tmp = scores_file.with_name(".eval_scores.csv.tmp")
        saved.to_csv(tmp, index=False)
        tmp.replace(scores_file)
        per_dataset = {
            r["dataset"]: {**_no_nan(r), "category": category_of(r["dataset"], categories)}
            for r in table.to_dict(orient="records")
        }
        for name, row in per_dataset.items():
            row.pop("dataset")
            row["prompt_example"] = facts["prompt_examples"].get(name)
        metrics = {
            "model_under_test": str(folder),
            **protocol.describe(),
            "backend": backend,
            "device": device(),
            "datasets_dir": str(resolve_path(ev.datasets_dir)),
            "num_few_shots": ev.num_few_shots,
            "max_samples": ev.max_samples,
            "chat_template": ev.chat_template,
            "avg": agg["avg"],
            "avg_complete": agg["avg_complete"],
            "avg_comparable": agg["avg_comparable"],
            "not_comparable": {
                r["dataset"]: r["not_comparable_reason"] for r in table.to_dict(orient="records") if not r["comparable"]
            },
            "avg_categories": agg["avg_categories"],
            "avg_excludes": agg["avg_excludes"],
            "categories": agg["categories"],
            "uncategorised": agg["uncategorised"],
            "datasets": per_dataset,
            "errors": errors,
            **{k: v for k, v in facts.items() if k != "prompt_examples"},
            "seconds": round(time.time() - t0, 2),
        }
        write_json(run.metrics_dir / "eval.json", metrics)
        run.save_figure(plot_categories(category_table(run), saved), "eval_categories")
        info["outputs"] = [pred_file, scores_file, run.metrics_dir / "eval.json"]
        info["metrics"] = {
            "avg": agg["avg"],
            "protocol": protocol.name,
            "backend": backend,
            "samples": facts["samples"],
            "samples_per_second": facts["samples_per_second"],
            "datasets": len(datasets),
            "errors": len(errors),
        }
    return saved


# ------------------------------------------------------------------------------------------- views


def category_table(run: Run) -> pd.DataFrame:
    """One row per category (score, datasets, missing ones, whether it counts in AVG), then an AVG row."""
    m = read_metrics(run.dir, STAGE)
    rows = [
        {
            "category": c,
            "score": v["score"],
            "datasets": ", ".join(v["datasets"]),
            "missing": ", ".join(v["missing"]),
            "not_comparable": ", ".join(v.get("not_comparable", [])),
            "in_avg": c in m["avg_categories"],
        }
        for c, v in m["categories"].items()
    ]
    rows.append(
        {
            "category": "AVG",
            "score": m["avg"],
            "datasets": ", ".join(m["avg_categories"]),
            "missing": "",
            "not_comparable": "" if m.get("avg_comparable", True) else "AVG not comparable",
            "in_avg": None,
        }
    )
    return pd.DataFrame(rows)


def errors_table(run: Run) -> pd.DataFrame:
    """Datasets that could not be loaded, with the file and the offending field."""
    return pd.DataFrame(read_metrics(run.dir, STAGE)["errors"], columns=["dataset", "path", "error"])


def predictions_table(run: Run, dataset: str | None = None) -> pd.DataFrame:
    """Per-sample predictions (raw output, normalised prediction, gold), optionally for one dataset."""
    df = pd.DataFrame(read_jsonl(run.data_dir / "eval_predictions.jsonl"))
    return df[df["dataset"] == dataset].reset_index(drop=True) if dataset else df


def plot_categories(categories: pd.DataFrame, datasets: pd.DataFrame | None = None) -> Any:
    """Bars per category with AVG as a line; beside it, each dataset's score and out-of-label rate."""
    cats = categories[categories["category"] != "AVG"]
    avg = categories.loc[categories["category"] == "AVG", "score"]
    panels = 2 if datasets is not None and len(datasets) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    values = [0.0 if v is None or pd.isna(v) else float(v) for v in cats["score"]]
    colors = ["tab:blue" if flag else "tab:gray" for flag in cats["in_avg"]]
    ax.bar(list(cats["category"]), values, color=colors)
    if len(avg) and avg.iloc[0] is not None and not pd.isna(avg.iloc[0]):
        ax.axhline(float(avg.iloc[0]), color="tab:red", ls="--", label=f"AVG {float(avg.iloc[0]):.3f}")
        ax.legend(loc="upper right")
    ax.set_ylim(min(0.0, *values) - 0.05 if values else 0.0, 1.0)
    ax.set_ylabel("score (0-1)")
    ax.set_title("Category scores (grey: not in AVG)")
    if panels == 2:
        ax = axes[0][1]
        x = list(range(len(datasets)))
        ax.bar([i - 0.2 for i in x], datasets["score"], width=0.4, label="score (main metric)")
        ool = [0.0 if v is None or pd.isna(v) else float(v) for v in datasets["out_of_label_rate"]]
        ax.bar([i + 0.2 for i in x], ool, width=0.4, color="tab:orange", label="out-of-label rate")
        ax.set_xticks(x, list(datasets["dataset"]), rotation=45, ha="right")
        ax.set_ylim(min(0.0, float(datasets["score"].min())) - 0.05, 1.0)
        ax.set_title("Datasets")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
