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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import EvalConfig, EvalMarkers, GenerationConfig, ModelConfig
from selftrain.generate import generate_candidates, pick_backend
from selftrain.io import DataError, read_json, read_jsonl, write_json, write_jsonl
from selftrain.metrics import METRICS, out_of_label_rate, prepare_gold, prepare_prediction, score
from selftrain.models import device
from selftrain.paths import resolve_path
from selftrain.plots import plt, save_figure
from selftrain.runs import Run
from selftrain.train import model_under_test

STAGE = "eval"
# Metrics reported on 0-100 (as sacrebleu does); divided by 100 for the 0-1 dataset score that
# categories average, so one BLEU dataset does not outweigh a category of accuracies.
PERCENT_METRICS = {"bleu_en", "bleu_ja"}
# Correlation metrics read the gold answers as numbers; a gold that is not one is a malformed file.
NUMERIC_GOLD_METRICS = {"pearson", "spearman"}
REQUIRED_FIELDS = ("instruction", "output_length", "metrics", "few_shots", "samples")


# ------------------------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """One llm-jp-eval preprocessed dataset file, validated."""

    name: str
    path: Path
    instruction: str
    output_length: int
    metrics: list[str]
    few_shots: list[dict[str, str]]
    samples: list[dict[str, str]]
    label_list: list[str] | None = None
    unsupported_metrics: list[str] = field(default_factory=list)

    @property
    def scored_metrics(self) -> list[str]:
        return [m for m in self.metrics if m in METRICS]

    @property
    def main_metric(self) -> str:
        return self.scored_metrics[0]


def _pairs(value: Any, key: str, path: Path, non_empty: bool) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{path}: field '{key}': expected a list, got {type(value).__name__}")
    if non_empty and not value:
        raise DataError(f"{path}: field '{key}': empty list")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: field '{key}[{i}]': expected an object, got {type(item).__name__}")
        for sub in ("input", "output"):
            if sub not in item:
                raise DataError(f"{path}: field '{key}[{i}].{sub}': missing")
            if not isinstance(item[sub], str):
                raise DataError(f"{path}: field '{key}[{i}].{sub}': expected a string, got {type(item[sub]).__name__}")
        out.append({"input": item["input"], "output": item["output"]})
    return out


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate one dataset file; DataError names the path and the offending field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    data = read_json(path)  # DataError with the position for invalid JSON
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in data:
            raise DataError(f"{path}: field '{key}': missing")
    if not isinstance(data["instruction"], str):
        raise DataError(f"{path}: field 'instruction': expected a string, got {type(data['instruction']).__name__}")
    length = data["output_length"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise DataError(f"{path}: field 'output_length': expected a positive integer, got {length!r}")
    metrics = data["metrics"]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise DataError(f"{path}: field 'metrics': expected a non-empty list of metric names, got {metrics!r}")
    if not any(m in METRICS for m in metrics):
        raise DataError(
            f"{path}: field 'metrics': none of {metrics} is implemented (known: {', '.join(sorted(METRICS))})"
        )
    few_shots = _pairs(data["few_shots"], "few_shots", path, non_empty=False)
    samples = _pairs(data["samples"], "samples", path, non_empty=True)
    labels = data.get("label_list")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise DataError(f"{path}: field 'label_list': expected a list of strings, got {labels!r}")
    if NUMERIC_GOLD_METRICS & set(metrics):
        for i, s in enumerate(samples):
            try:
                float(prepare_gold(s["output"]))
            except ValueError:
                raise DataError(
                    f"{path}: field 'samples[{i}].output': {s['output']!r} is not a number, "
                    f"which metric(s) {sorted(NUMERIC_GOLD_METRICS & set(metrics))} need"
                ) from None
    return Dataset(
        name=path.stem,
        path=path,
        instruction=data["instruction"],
        output_length=length,
        metrics=list(metrics),
        few_shots=few_shots,
        samples=samples,
        label_list=list(labels) if labels else None,
        unsupported_metrics=[m for m in metrics if m not in METRICS],
    )


def dataset_paths(datasets_dir: str | Path, names: Sequence[str] = ()) -> list[Path]:
    """The dataset files a run reads: `names` in that order (existing or not), else every *.json, sorted."""
    folder = resolve_path(datasets_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: benchmark datasets folder not found (eval.datasets_dir)")
    paths = [folder / f"{n}.json" for n in names] if names else sorted(folder.glob("*.json"))
    if not paths:
        raise DataError(f"{folder}: no *.json dataset files (eval.datasets_dir)")
    return paths


def load_datasets(datasets_dir: str | Path, names: Sequence[str] = ()) -> tuple[list[Dataset], list[dict[str, str]]]:
    """The valid datasets of a folder (all *.json, or `names` in that order) and one error record per bad one.

    A bad file does not stop the others: it becomes ``{"dataset", "path", "error"}``. A missing folder does.
    """
    good, errors = [], []
    for p in dataset_paths(datasets_dir, names):
        try:
            good.append(load_dataset(p))
        except DataError as e:
            errors.append({"dataset": p.stem, "path": str(p), "error": str(e)})
    return good, errors


# ------------------------------------------------------------------------------------------- prompts


def build_prompt(
    instruction: str,
    few_shots: Sequence[Mapping[str, str]],
    input_text: str,
    preamble: str,
    markers: EvalMarkers,
) -> str:
    """llm-jp-eval v1.3.0's prompt: preamble, instruction, the given few-shots, then the input (no answer)."""
    text = f"{preamble}\n\n" if preamble else ""
    text += f"{markers.instruction}\n{instruction}"
    for shot in few_shots:
        text += f"\n\n{markers.input}\n{shot['input']}\n\n{markers.response}\n{shot['output']}"
    return text + f"\n\n{markers.input}\n{input_text}\n\n{markers.response}\n"


def fit_prompt(
    dataset: Dataset, input_text: str, cfg: EvalConfig, count_tokens: Callable[[str], int], max_len: int
) -> tuple[str, int, bool]:
    """The prompt with the first k few-shots, k lowered until prompt + output_length fit in max_len.

    Returns (prompt, k used, fits). llm-jp-eval does not shorten (its datasets fit 4k-token models); here
    a small model's context must not crash the whole stage, and every shortened prompt is counted.
    """
    k = min(cfg.num_few_shots, len(dataset.few_shots))
    while True:
        prompt = build_prompt(dataset.instruction, dataset.few_shots[:k], input_text, cfg.preamble, cfg.markers)
        if count_tokens(prompt) + dataset.output_length <= max_len:
            return prompt, k, True
        if k == 0:
            return prompt, 0, False
        k -= 1


def _token_counter(tok: Any, chat: bool) -> Callable[[str], int]:
    if chat:

        def count(prompt: str) -> int:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return len(tok(text, add_special_tokens=False)["input_ids"])

        return count
    return lambda prompt: len(tok(prompt)["input_ids"])


def _bos_prefix(tok: Any, backend: str, chat: bool) -> str:
    # llm-jp-eval tokenises plain prompts with the tokenizer's special tokens (BOS for llm-jp-3), and so does
    # vLLM; our transformers backend encodes prompt strings without them, so the BOS goes into the text.
    if chat or backend != "transformers" or tok.bos_token is None:
        return ""
    ids = tok("a")["input_ids"]
    return tok.bos_token if ids and ids[0] == tok.bos_token_id else ""


# ------------------------------------------------------------------------------------------- scoring


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


def _category_of(name: str, categories: Mapping[str, Sequence[str]]) -> str:
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


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(
    folder: Path,
    model_cfg: ModelConfig,
    cfg: EvalConfig,
    datasets: Sequence[Dataset],
    backend: str,
    seed: int = 1234,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], pd.DataFrame, dict[str, Any]]:
    """Ask every sample of every dataset in one backend call (the model is loaded once) and score them.

    Returns (per-sample prediction records, per-dataset score table, run facts: timings, prompt examples).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    count = _token_counter(tok, cfg.chat_template)
    bos = _bos_prefix(tok, backend, cfg.chat_template)
    jobs: list[dict[str, Any]] = []
    examples: dict[str, str] = {}
    for ds in datasets:
        for i, s in enumerate(ds.samples[: cfg.max_samples]):
            prompt, k, fits = fit_prompt(ds, s["input"], cfg, count, model_cfg.max_model_len)
            examples.setdefault(ds.name, prompt)
            jobs.append({"ds": ds, "index": i, "sample": s, "prompt": prompt, "few_shots": k, "fits": fits})
    todo = [j for j in jobs if j["fits"]]
    if backend == "transformers":
        # Batches are cut per token cap in list order: sorting by length keeps padding (wasted prefill) small.
        todo.sort(key=lambda j: (j["ds"].output_length, count(j["prompt"])))
    gen = GenerationConfig(
        backend=backend,
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=max([j["ds"].output_length for j in todo], default=1),
        seed=seed,
        batch_size=cfg.batch_size,
    )
    t0 = time.perf_counter()
    outs: list[dict[str, Any]] = []
    if todo:
        prompts: list[Any] = (
            [[{"role": "user", "content": j["prompt"]}] for j in todo]
            if cfg.chat_template
            else [bos + j["prompt"] for j in todo]
        )
        outs = generate_candidates(
            folder,
            model_cfg,
            gen,
            prompts,
            backend,
            progress,
            chat=cfg.chat_template,
            max_new_tokens=[j["ds"].output_length for j in todo],
        )
    seconds = time.perf_counter() - t0
    for j, o in zip(todo, sorted(outs, key=lambda r: r["prompt_index"]), strict=True):
        j["out"] = o
    records = []
    for j in jobs:
        ds, s, o = j["ds"], j["sample"], j.get("out")
        raw = o["text"] if o else ""  # a prompt too long for the model scores as an empty answer
        pred = prepare_prediction(raw)
        records.append(
            {
                "dataset": ds.name,
                "index": j["index"],
                "input": s["input"],
                "gold": s["output"],
                "raw": raw,
                "prediction": pred,
                "exact": pred == prepare_gold(s["output"]),
                "in_labels": (pred in {prepare_gold(x) for x in ds.label_list}) if ds.label_list else None,
                "few_shots": j["few_shots"],
                "finish_reason": o["finish_reason"] if o else "too_long",
                "num_tokens": o["num_tokens"] if o else 0,
            }
        )
    rows = []
    for ds in datasets:
        recs = [r for r in records if r["dataset"] == ds.name]
        row = {"dataset": ds.name, **score_dataset(ds, [r["raw"] for r in recs], [r["gold"] for r in recs])}
        row["few_shots"] = min(r["few_shots"] for r in recs)
        row["shortened"] = sum(r["few_shots"] < min(cfg.num_few_shots, len(ds.few_shots)) for r in recs)
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
    out.insert(1, "category", [_category_of(n, categories) for n in out["dataset"]])
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
    folder = model_under_test(run)  # M0 for baseline; refuses an unfinished training stage
    files = [p for p in dataset_paths(ev.datasets_dir, ev.datasets) if p.is_file()]
    with run.stage(STAGE, inputs=files) as info:
        t0 = time.time()
        datasets, errors = load_datasets(ev.datasets_dir, ev.datasets)
        for e in errors:
            warnings.warn(f"dataset skipped: {e['error']}", stacklevel=2)
        if not datasets:
            raise DataError("no valid benchmark dataset:\n  " + "\n  ".join(e["error"] for e in errors))
        backend = pick_backend(ev.backend)
        records, table, facts = evaluate(folder, cfg.model, ev, datasets, backend, cfg.seed, progress)
        agg = aggregate(table, ev.categories, ev.avg_excludes)
        pred_file = run.data_dir / "eval_predictions.jsonl"
        write_jsonl(pred_file, records)
        saved = _score_columns(table, ev.categories)
        tmp = scores_file.with_name(".eval_scores.csv.tmp")
        saved.to_csv(tmp, index=False)
        tmp.replace(scores_file)
        per_dataset = {
            r["dataset"]: {**_no_nan(r), "category": _category_of(r["dataset"], ev.categories)}
            for r in table.to_dict(orient="records")
        }
        for name, row in per_dataset.items():
            row.pop("dataset")
            row["prompt_example"] = facts["prompt_examples"].get(name)
        metrics = {
            "model_under_test": str(folder),
            "backend": backend,
            "device": device(),
            "datasets_dir": str(resolve_path(ev.datasets_dir)),
            "num_few_shots": ev.num_few_shots,
            "max_samples": ev.max_samples,
            "chat_template": ev.chat_template,
            "avg": agg["avg"],
            "avg_complete": agg["avg_complete"],
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
        fig = plot_categories(category_table(run), saved)
        save_figure(fig, run.figures_dir / "eval_categories")
        plt.close(fig)  # the notebook draws its own copy
        info["outputs"] = [pred_file, scores_file, run.metrics_dir / "eval.json"]
        info["metrics"] = {
            "avg": agg["avg"],
            "backend": backend,
            "samples": facts["samples"],
            "samples_per_second": facts["samples_per_second"],
            "datasets": len(datasets),
            "errors": len(errors),
        }
    return saved


# ------------------------------------------------------------------------------------------- views


def summary_table(run: Run) -> pd.DataFrame:
    """The stage's key facts: model, backend, sizes, speed, AVG, how many datasets failed to load."""
    m = read_json(run.metrics_dir / "eval.json")
    keys = [
        "model_under_test",
        "backend",
        "device",
        "datasets_dir",
        "num_few_shots",
        "chat_template",
        "samples",
        "generated_tokens",
        "generation_seconds",
        "samples_per_second",
        "seconds",
        "avg",
        "avg_complete",
    ]
    rows = {k: m.get(k) for k in keys}
    rows["datasets"] = len(m["datasets"])
    rows["dataset_errors"] = len(m["errors"])
    return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


def category_table(run: Run) -> pd.DataFrame:
    """One row per category (score, datasets, missing ones, whether it counts in AVG), then an AVG row."""
    m = read_json(run.metrics_dir / "eval.json")
    rows = [
        {
            "category": c,
            "score": v["score"],
            "datasets": ", ".join(v["datasets"]),
            "missing": ", ".join(v["missing"]),
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
            "in_avg": None,
        }
    )
    return pd.DataFrame(rows)


def errors_table(run: Run) -> pd.DataFrame:
    """Datasets that could not be loaded, with the file and the offending field."""
    return pd.DataFrame(read_json(run.metrics_dir / "eval.json")["errors"], columns=["dataset", "path", "error"])


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
