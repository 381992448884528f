"""Stage 06: an llm-jp-eval-compatible benchmark of the model under test.

Datasets are llm-jp-eval's preprocessed JSON files (one per dataset: ``instruction``, ``output_length``,
``metrics``, ``few_shots``, ``samples`` of ``input``/``output``, optionally ``label_list``). Each sample is
asked with llm-jp-eval v1.3.0's prompt layout::

    {preamble}\\n\\n{instruction marker}\\n{instruction}
    (\\n\\n{input marker}\\n{few-shot input}\\n\\n{response marker}\\n{few-shot output}) x k
    \\n\\n{input marker}\\n{input}\\n\\n{response marker}\\n

or, with ``eval.chat_layout: turns`` (own protocol), as chat turns (the instruction as the system turn, each few-shot
a user and an assistant turn, the input the last user turn); decoded greedily up to ``output_length`` new tokens
(with ``eval.sampled.k``, also k answers sampled as the judge samples its answers), and scored with
:mod:`selftrain.evaluate.metrics` (llm-jp-eval's definitions). A dataset's score is its main metric (the first
metric its file lists that we implement; BLEU rescaled from 0-100 to 0-1), a category's score the mean over its
datasets, AVG the mean over the categories (``eval.categories`` / ``eval.avg_excludes``). A malformed dataset file is
reported with its path and field in ``metrics/eval.json`` and the other datasets still run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import EvalConfig, GenerationConfig, ModelConfig, RunConfig, SamplingConfig
from selftrain.evaluate.datasets import Dataset, dataset_paths, load_datasets
from selftrain.evaluate.prompts import bos_prefix, chat_turns, fit_prompt, token_counter
from selftrain.evaluate.protocols import Protocol, ProtocolError, load_protocol
from selftrain.evaluate.scoring import aggregate, category_of, score_dataset
from selftrain.inference import device, generate_candidates, inference_dtype, pick_backend, stage_numerics
from selftrain.io import DataError, read_jsonl, sha256_json, write_csv, write_json, write_jsonl
from selftrain.models import model_fingerprint
from selftrain.paths import resolve_path
from selftrain.plotting import plt
from selftrain.runs import Run, find_run
from selftrain.schema import read_metrics
from selftrain.shards import Part, check_shard, group_shards, produce_shard, remove_shards, run_sharded

STAGE = "eval"


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Predictions:
    """What stage 06 asks the model: every sample's prompt job, the ones that fit the context (`todo`, in the
    backend's order) with their inputs and token caps, and the key of everything that shapes the answers."""

    jobs: list[dict[str, Any]]
    todo: list[dict[str, Any]]
    inputs: list[Any]
    caps: list[int]
    gen: GenerationConfig
    chat: bool
    add_bos: bool
    examples: dict[str, str]
    wanted: dict[str, int]
    key: str
    decoding: dict[str, Any]  # how the answers are decoded and why (the protocol's rule; recorded in eval.json)

    def groups(self) -> list[list[int]]:
        """Indices into `todo` per token cap, caps ascending: the backend batches each cap apart, in this order."""
        return [[i for i, c in enumerate(self.caps) if c == cap] for cap in sorted(set(self.caps))]


def plan_predictions(
    folder: Path,
    model_cfg: ModelConfig,
    cfg: EvalConfig,
    datasets: Sequence[Dataset],
    backend: str,
    seed: int,
    protocol: Protocol,
) -> Predictions:
    """Every sample's prompt (few-shots shortened to fit the context where the protocol allows) and token cap."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    count = token_counter(tok, cfg.chat_template)
    bos = bos_prefix(tok, backend, cfg.chat_template, protocol.add_bos)
    jobs: list[dict[str, Any]] = []
    examples: dict[str, str] = {}
    wanted: dict[str, int] = {}
    turns = cfg.chat_layout == "turns"  # validated: chat template, own protocol
    for ds in datasets:
        shots = protocol.few_shots(ds)
        wanted[ds.name] = len(shots)
        for i, s in enumerate(ds.samples[: cfg.max_samples]):
            # A string prompt, or chat turns (eval.chat_layout turns).
            render: Callable[[Sequence[Mapping[str, str]]], Any] = (
                partial(chat_turns, ds.instruction, input_text=s["input"])
                if turns
                else partial(protocol.prompt, ds, input_text=s["input"])
            )
            prompt, k, fits = fit_prompt(
                render,
                shots,
                protocol.max_new_tokens(ds),
                count,
                model_cfg.max_model_len,
                shorten=protocol.own,
            )
            if ds.name not in examples:  # eval.json shows one prompt per dataset, as text
                examples[ds.name] = str(
                    tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if turns else prompt
                )
            jobs.append({"ds": ds, "index": i, "sample": s, "prompt": prompt, "few_shots": k, "fits": fits})
    todo = [j for j in jobs if j["fits"]]
    if backend == "transformers":
        # Batches are cut per token cap in list order: sorting by length keeps padding (wasted prefill) small.
        todo.sort(key=lambda j: (j["ds"].output_length, count(j["prompt"])))
    caps = [protocol.max_new_tokens(j["ds"]) for j in todo]
    decoding = protocol.decoding(folder)  # greedy, or (v1.3) the model's generation_config under the version's
    gen = GenerationConfig(
        backend=backend, n=1, temperature=decoding["temperature"], top_p=decoding["top_p"],
        max_new_tokens=max(caps, default=1), seed=seed, batch_size=cfg.batch_size,
    )  # fmt: skip
    inputs: list[Any] = (
        [j["prompt"] if turns else [{"role": "user", "content": j["prompt"]}] for j in todo]
        if cfg.chat_template
        else [bos + j["prompt"] for j in todo]
    )
    shape = {
        "model": model_fingerprint(folder), "dtype": inference_dtype(model_cfg.dtype, backend),
        "max_model_len": model_cfg.max_model_len,
        "inputs": inputs, "caps": caps, "backend": backend, "chat": cfg.chat_template, "add_bos": protocol.add_bos,
        "seed": seed,
        # transformers' batches (padding) shape greedy answers; vLLM's batching differs with the shard count
        **({"batch_size": cfg.batch_size} if backend == "transformers" else {"shards": cfg.shards}),
        # sampled decoding (a model whose generation_config samples, under v1.3) answers otherwise
        **({} if decoding["greedy"] else {"decoding": {k: decoding[k] for k in ("temperature", "top_p", "top_k")}}),
    }  # fmt: skip
    return Predictions(
        jobs, todo, inputs, caps, gen, cfg.chat_template, protocol.add_bos, examples, wanted, sha256_json(shape)[:16],
        decoding,
    )  # fmt: skip


def _prediction_producer(
    folder: Path, model_cfg: ModelConfig, p: Predictions, backend: str, progress: bool
) -> Callable[[list[Part] | None], list[dict[str, Any]]]:
    """The answers of some (cap group, range) parts, with `prompt_index` the place in `p.todo`."""
    groups = p.groups()

    def produce(parts: list[Part] | None) -> list[dict[str, Any]]:
        # None: every prompt in `todo` order (the unsharded call, exactly as it always was)
        sel = list(range(len(p.todo))) if parts is None else [groups[g][i] for g, r in parts for i in r]
        outs = generate_candidates(
            folder, model_cfg, p.gen, [p.inputs[i] for i in sel], backend, progress, chat=p.chat,
            max_new_tokens=[p.caps[i] for i in sel], add_special_tokens=p.add_bos, top_k=p.decoding["top_k"],
        )  # fmt: skip
        return [{**o, "prompt_index": sel[o["prompt_index"]]} for o in outs]

    return produce


def _split(p: Predictions, cfg: EvalConfig, backend: str) -> list[list[Part]]:
    # Shards of whole transformers batches within each cap group: the batches, hence the answers, are unsharded's.
    return group_shards([len(g) for g in p.groups()], cfg.shards, cfg.batch_size if backend == "transformers" else 1)


def prediction_shards(cache_dir: str | Path, key: str) -> Path:
    """Where the shards of stage 06's predictions with this key live."""
    return resolve_path(cache_dir) / "predictions" / key


def evaluate(
    folder: Path,
    model_cfg: ModelConfig,
    cfg: EvalConfig,
    datasets: Sequence[Dataset],
    backend: str,
    seed: int = 1234,
    progress: bool = True,
    protocol: Protocol | None = None,
    cache_dir: str | Path | None = None,
    sampling: SamplingConfig | None = None,
) -> tuple[list[dict[str, Any]], pd.DataFrame, dict[str, Any]]:
    """Ask every sample of every dataset in one backend call (the model is loaded once) and score them as the
    protocol says (default: the config's own). With eval.shards > 1 the prompts are answered shard by shard under
    `cache_dir` (shards already made by `selftrain shard --stage eval` are used); the caller removes them once its
    outputs are written (facts["shard_folder"]). With eval.sampled.k > 0, a second call draws k answers per prompt
    at `sampling` (the judge's answer sampling: temperature, top_p, seed, seeding), each scored by exact match.

    Returns (per-sample prediction records, per-dataset score table, run facts: timings, prompt examples).
    """
    protocol = protocol or load_protocol(cfg)
    p = plan_predictions(folder, model_cfg, cfg, datasets, backend, seed, protocol)
    jobs, todo, wanted = p.jobs, p.todo, p.wanted
    t0 = time.perf_counter()
    outs: list[dict[str, Any]] = []
    made, shard_folder = [0], None
    if todo:
        produce = _prediction_producer(folder, model_cfg, p, backend, progress)
        if cfg.shards == 1:
            outs = produce(None)
        else:
            if cache_dir is None:
                raise ValueError("eval.shards > 1 needs a cache_dir for the shards")
            shard_folder = prediction_shards(cache_dir, p.key)
            outs, made = run_sharded(shard_folder, _split(p, cfg, backend), produce)
    seconds = time.perf_counter() - t0
    for j, out in zip(todo, sorted(outs, key=lambda r: r["prompt_index"]), strict=True):
        j["out"] = out
    k = cfg.sampled.k
    sampled_seconds = 0.0
    if k and todo:
        if sampling is None:
            raise ValueError("eval.sampled.k > 0 needs the answer sampling (judge.answers) to draw with")
        t1 = time.perf_counter()
        gen = GenerationConfig(
            backend=backend, n=k, temperature=sampling.temperature, top_p=sampling.top_p,
            max_new_tokens=max(p.caps), seed=sampling.seed, seeding=sampling.seeding, batch_size=cfg.batch_size,
        )  # fmt: skip
        drawn = generate_candidates(folder, model_cfg, gen, p.inputs, backend, progress, chat=p.chat,
                                    max_new_tokens=p.caps, add_special_tokens=p.add_bos)  # fmt: skip
        sampled_seconds = time.perf_counter() - t1
        for r in sorted(drawn, key=lambda r: (r["prompt_index"], r["candidate_index"])):
            todo[r["prompt_index"]].setdefault("sampled", []).append(r["text"])
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
        if k:  # a prompt too long for the model: k empty answers
            preds = [protocol.extract(ds, t) for t in j.get("sampled", [""] * k)]
            records[-1]["sampled_predictions"] = preds
            records[-1]["sampled_exact"] = sum(x == gold for x in preds) / k
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
            comet_device=protocol.comet_device["value"],
            unconfirmed=protocol.unconfirmed(ds),
        )
        row = {"dataset": ds.name, **scored}
        row["few_shots"] = min(r["few_shots"] for r in recs)
        row["few_shots_wanted"] = wanted[ds.name]
        row["shortened"] = sum(r["few_shots"] < wanted[ds.name] for r in recs)
        row["too_long"] = sum(r["finish_reason"] == "too_long" for r in recs)
        if k:
            row["sampled_exact"] = sum(r["sampled_exact"] for r in recs) / len(recs) if recs else None
        rows.append(row)
    facts = {
        "samples": len(records),
        "generated_samples": len(todo),
        "generated_tokens": sum(o["num_tokens"] for o in outs),
        "generation_seconds": round(seconds, 2),  # model load included: one load for every dataset
        "samples_per_second": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
        "shards": cfg.shards,
        "shards_predicted_here": made,  # the others came from `selftrain shard --stage eval`
        "shard_folder": shard_folder,
        "prompt_examples": p.examples,
        "decoding": p.decoding,
    }
    if k:
        facts["sampled"] = sampled_summary(records, cfg, sampling, sampled_seconds)
    return records, pd.DataFrame(rows), facts


def sampled_summary(
    records: list[dict[str, Any]], cfg: EvalConfig, sampling: SamplingConfig | None, seconds: float
) -> dict[str, Any]:
    """eval.json's `sampled` block: how the k answers were drawn, and exact match as the mean over items of the
    greedy answer (`greedy_exact`) and of the k sampled ones (`exact`), overall and per dataset."""

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 6) if values else None

    names = list(dict.fromkeys(r["dataset"] for r in records))
    return {
        "k": cfg.sampled.k,
        "source": "judge.answers",
        **({k: getattr(sampling, k) for k in ("temperature", "top_p", "seed", "seeding")} if sampling else {}),
        "items": len(records),
        "exact": mean([r["sampled_exact"] for r in records]),
        "greedy_exact": mean([float(r["exact"]) for r in records]),
        "datasets": {n: mean([r["sampled_exact"] for r in records if r["dataset"] == n]) for n in names},
        "generation_seconds": round(seconds, 2),
    }


def _score_columns(df: pd.DataFrame, categories: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """The per-dataset table as saved in eval_scores.csv: one column per metric, category first."""
    out = df.drop(columns=["metrics", "unsupported_metrics"]).copy()
    out.insert(1, "category", [category_of(n, categories) for n in out["dataset"]])
    metric_names = sorted({m for d in df["metrics"] for m in d})
    for m in metric_names:
        out[m] = [d.get(m) for d in df["metrics"]]
    return out


def _no_score(row: dict[str, Any]) -> bool:
    v = row.get("score")
    return v is None or (isinstance(v, float) and math.isnan(v))


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
        protocol, datasets, errors = _load(ev)
        for e in errors:
            warnings.warn(f"dataset skipped: {e['error']}", stacklevel=2)
        backend = pick_backend(ev.backend)
        info["numerics"] = stage_numerics(cfg.model.dtype, backend)
        records, table, facts = evaluate(
            folder, cfg.model, ev, datasets, backend, cfg.seed, progress, protocol, cfg.output.cache_dir,
            cfg.judge.answers if ev.sampled.k else None,
        )  # fmt: skip
        shard_folder = facts.pop("shard_folder")
        categories = protocol.category_names()
        rows = table.to_dict(orient="records")
        # not comparable without a score: the metric could not run; with one: the version's metric is unconfirmed
        blocked = {r["dataset"]: r["not_comparable_reason"] for r in rows if not r["comparable"] and _no_score(r)}
        unsure = {r["dataset"]: r["not_comparable_reason"] for r in rows if not r["comparable"] and not _no_score(r)}
        agg = aggregate(table, categories, protocol.avg_excludes, protocol.empty_category, blocked, unsure,
                        protocol.no_avg_reason)  # fmt: skip
        pred_file = run.data_dir / "eval_predictions.jsonl"
        write_jsonl(pred_file, records)
        saved = _score_columns(table, categories)
        write_csv(scores_file, saved)
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
            "avg_not_comparable": agg["avg_not_comparable"],
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
        if shard_folder is not None:
            remove_shards(shard_folder)  # merged and written
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
            **({"sampled_exact": facts["sampled"]["exact"]} if "sampled" in facts else {}),
        }
    return saved


def _load(ev: EvalConfig) -> tuple[Protocol, list[Dataset], list[dict[str, Any]]]:
    """The protocol and the datasets it can run (every mismatched file at once, one line each), and the files
    that could not be read."""
    protocol = load_protocol(ev)
    datasets, errors = load_datasets(ev.datasets_dir, ev.datasets, require_metric=protocol.own)
    bad = []
    for ds in datasets:
        try:
            protocol.check_dataset(ds)
        except ProtocolError as e:
            bad.append(str(e))
    if bad:
        raise ProtocolError(f"{len(bad)} dataset file(s) do not match eval.protocol:\n  " + "\n  ".join(bad))
    if not datasets:
        raise DataError("no valid benchmark dataset:\n  " + "\n  ".join(e["error"] for e in errors))
    return protocol, datasets, errors


def run_shard(cfg: RunConfig, shard: int, progress: bool = True) -> dict[str, Any]:
    """Predict one shard of stage 06's benchmark prompts into the cache: what a Slurm array task or a process pinned
    to one GPU runs once the cell's training is done. The cell's own run version (`find_run`: never created here)
    is only read. Stage 06 later merges every shard and scores. Returns where and what it did."""
    ev = cfg.eval
    check_shard(shard, ev.shards, "eval.shards")  # before any run folder or model is opened
    run = find_run(cfg)
    folder = run.model_under_test()
    protocol, datasets, _ = _load(ev)
    backend = pick_backend(ev.backend)
    p = plan_predictions(folder, cfg.model, ev, datasets, backend, cfg.seed, protocol)
    parts = _split(p, ev, backend)[shard]
    shard_folder = prediction_shards(cfg.output.cache_dir, p.key)
    produce = _prediction_producer(folder, cfg.model, p, backend, progress)
    # done: merged and scored, nothing left to do (asked under the shard folder's lock)
    made = produce_shard(shard_folder, shard, ev.shards, parts, produce, lambda: run.is_done(STAGE))
    return {"cache": str(shard_folder), "shard": shard, "shards": ev.shards,
            "items": sum(len(r) for _, r in parts), "generated": bool(made)}  # fmt: skip


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
    if panels == 2 and datasets is not None:
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
