"""The pairwise utilities MBR selection averages over a pool, by the name `selection.utility` gives them.

Each takes a prompt set's pools (the first n candidates and the original, per prompt) and returns either L2-normalised
embeddings (cosine is the utility) or a utility matrix per pool, with what the stage records about how they were
computed. Stage 02 looks the utility up in UTILITIES; a new one is a function here and a line in the table.

- ``self-embedding``: the target model's own pooled hidden states over the response tokens (`embedding.*`), cached
  by model + candidates + params under ``<cache_dir>/embeddings/`` and shared by every method of a model: computed
  once, under the entry's lock (the other methods' stage 02 started at the same time wait and read it);
- ``embedder``: an external sentence embedder (`selection.embedder`);
- ``chrf``: sentence chrF, character 1-6-grams (lexical MBR);
- ``judge``: the stage-05 judge's pointwise scores or pairwise preferences (`selection.judge`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.config import EmbeddingConfig, RunConfig
from selftrain.graders.clients import make_judge
from selftrain.inference import free_memory, inference_dtype, load_hf, release_frames
from selftrain.io import load_cached_npy, sha256_file, sha256_json, write_npy
from selftrain.models import model_fingerprint, resolve_model_path
from selftrain.paths import resolve_path
from selftrain.select.judge_utility import judge_sim
from selftrain.select.similarity import centre, chrf_sim, embedder_embeddings
from selftrain.shards import holding


@dataclass
class Pools:
    """What a utility scores: P prompts, each with all generated `texts` (generation.n), and its `pools` (the first
    n candidates + the original; `valid` marks the members that count)."""

    cfg: RunConfig
    prompts: list[dict]
    texts: list[list[str]]
    pools: list[list[str]]
    valid: np.ndarray
    n: int
    cand_file: Path
    progress: bool


@dataclass
class Scored:
    """A utility's result: `emb` (P, n+1, d) normalised embeddings or `sim` (P, n+1, n+1) utilities; the cache entry
    it used; what the manifest records (`numerics`) and what select.json adds (`metrics`)."""

    emb: np.ndarray | None = None
    sim: np.ndarray | None = None
    cache_key: str | None = None
    numerics: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def self_embedding(p: Pools) -> Scored:
    cfg, n, n_all = p.cfg, p.n, p.cfg.generation.n
    emb, key, hit = _embeddings(cfg, p.prompts, p.texts, p.cand_file, p.progress)  # every candidate: shared cache
    emb = centre(emb[:, [*range(n), n_all]], p.valid, cfg.embedding.center)
    numerics = {"dtype": inference_dtype(cfg.model.dtype, "transformers"), "backend": "transformers"}
    return Scored(emb=emb, cache_key=key, numerics=numerics, metrics={"embedding_cache_hit": hit})


def embedder(p: Pools) -> Scored:
    cfg = p.cfg
    emb, key = embedder_embeddings(p.pools, cfg.selection.embedder, cfg.output.cache_dir, p.progress)
    emb = centre(emb, p.valid, cfg.embedding.center)
    return Scored(emb=emb, cache_key=key, numerics={"utility": "embedder", "embedder": cfg.selection.embedder.path})


def chrf(p: Pools) -> Scored:
    return Scored(sim=chrf_sim(p.pools, p.progress), numerics={"utility": "chrf"})


def judge(p: Pools) -> Scored:
    cfg = p.cfg
    grader = make_judge(cfg.judge, cfg.output.cache_dir)
    questions = [question_text(q["messages"]) for q in p.prompts]
    sim, stats = judge_sim(grader, cfg.judge, cfg.selection.judge, questions, p.pools, p.valid, p.progress)
    numerics = {"utility": "judge", **grader.describe(), "scoring": cfg.judge.scoring}
    return Scored(sim=sim, numerics=numerics, metrics={"judge_utility": stats})


UTILITIES: dict[str, Callable[[Pools], Scored]] = {
    "self-embedding": self_embedding, "embedder": embedder, "chrf": chrf, "judge": judge,
}  # fmt: skip


def question_text(messages: list[dict]) -> str:
    """The prompt as the judge utility shows it: the last user turn, with any earlier turns above it."""
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


# ------------------------------------------------------------------------------------------- self-embedding


def embed_responses(
    model: Any,
    tok: Any,
    conversations: list[list[dict]],
    responses: list[str],
    cfg: EmbeddingConfig,
    progress: bool = True,
) -> np.ndarray:
    """L2-normalised pooled hidden states over the response tokens of prompt + response sequences.

    The prompt is rendered with the chat template (generation prompt on) and the response appended as
    token ids, so exactly the response's tokens are pooled. Empty responses give a zero vector.
    """
    import torch
    from tqdm.auto import tqdm

    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    cache: dict[str, list[int]] = {}
    seqs: list[tuple[list[int], int]] = []  # (ids, number of response tokens at the end)
    for prompt, resp in zip(rendered, responses, strict=True):
        p_ids = cache.setdefault(prompt, tok(prompt, add_special_tokens=False)["input_ids"])
        r_ids = tok(resp, add_special_tokens=False)["input_ids"] if resp.strip() else []
        r_ids = r_ids[: cfg.max_length - 1]
        p_ids = p_ids[-(cfg.max_length - len(r_ids)) :]  # cut the prompt from the left, never the response
        seqs.append((p_ids + r_ids, len(r_ids)))
    d = model.config.hidden_size
    out = np.zeros((len(seqs), d), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths batch together
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    backbone = getattr(model, "base_model", model)
    bar = tqdm(total=len(seqs), desc="embed", unit="seq", disable=not progress)
    try:
        _embed_batches(model, backbone, seqs, order, out, pad, cfg, bar, torch)
    finally:
        bar.close()  # on an interrupt too
    return out


def _embed_batches(
    model: Any, backbone: Any, seqs: list, order: list[int], out: np.ndarray, pad: int, cfg: EmbeddingConfig,
    bar: Any, torch: Any,
) -> None:  # fmt: skip
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        resp = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            toks, n_resp = seqs[i]
            ids[row, : len(toks)] = torch.tensor(toks)
            attn[row, : len(toks)] = 1
            resp[row, len(toks) - n_resp : len(toks)] = True
        dev = model.device
        with torch.inference_mode():
            # The decoder alone: same hidden states, without the LM head's [batch, length, vocab] logits.
            hs = backbone(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True).hidden_states
        h = hs[cfg.layer].float()
        resp = resp.to(dev)
        if cfg.pooling == "mean":
            w = resp.unsqueeze(-1).float()
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        else:  # last response token
            last = (resp.long() * torch.arange(width, device=dev)).argmax(1)
            pooled = h[torch.arange(len(idx), device=dev), last] * resp.any(1, keepdim=True)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out[idx] = pooled.cpu().numpy()
        bar.update(len(idx))


def _embeddings(
    cfg: RunConfig, prompts: list[dict], texts: list[list[str]], cand_file: Path, progress: bool
) -> tuple[np.ndarray, str, bool]:
    """(P, n+1, d) embeddings, their cache key and whether the cache had them; cached by model + candidates +
    embedding params (shared by methods). The entry's lock is held while it is looked up and filled: of several
    methods' stage 02 at once (array tasks of one model), one computes and the others wait and read it."""
    folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
    key = sha256_json(
        {
            "model": model_fingerprint(folder),
            "candidates": sha256_file(cand_file),
            "prompts": [(p["id"], p["messages"], p["original"]) for p in prompts],
            "embedding": cfg.embedding.model_dump(exclude={"center"}),  # centring happens after the cache
            "dtype": cfg.model.dtype,
        }
    )[:16]
    cache = resolve_path(cfg.output.cache_dir) / "embeddings" / f"{key}.npy"
    P, K = len(prompts), len(texts[0]) + 1
    with holding(cache):  # embeddings/.<key>.npy.lock
        emb = load_cached_npy(cache, "embedding")
        if emb is not None:
            return emb.reshape(P, K, -1), key, True
        model, tok = load_hf(folder, cfg.model.dtype, padding_side="right")
        convs = [p["messages"] for p in prompts for _ in range(K)]
        resps = [t for p, row in zip(prompts, texts, strict=True) for t in [*row, p["original"]]]
        try:
            emb = embed_responses(model, tok, convs, resps, cfg.embedding, progress)
        except BaseException as e:
            release_frames(e)  # an interrupted embedding pass must not keep the model alive in the traceback
            raise
        finally:
            del model
            free_memory()
        write_npy(cache, emb, record=True)
    return emb.reshape(P, K, -1), key, False
