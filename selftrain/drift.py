"""Drift monitors of self-training in rounds (study.rounds): what tells, round after round, whether a model that
trains on its own answers is narrowing towards collapse. Stage 01 measures the model (perplexity of held-out human
responses), stage 02 its candidates (diversity within each prompt's pool, the selected target's margin); stage 07
sets them side by side per round and flags collapse.

Definitions (a pool: one prompt's non-empty candidates; a pool of fewer than two is left out of the pool means):

- ``distinct_n``: distinct word n-grams over all word n-grams of a pool's candidates (words: whitespace-split, case
  kept; n-grams never cross two candidates), averaged over pools (Li et al.'s distinct-n, per pool);
- ``pool_cosine``: mean cosine of the ordered pairs (j, k), j != k, of a pool's candidates under a fixed external
  embedder (the same in every round, so the geometry does not drift with the model), averaged over pools;
- ``self_chrf``: mean sentence chrF (0-100) of the ordered pairs, j as hypothesis and k as reference, averaged over
  pools: the lexical twin of self-BLEU (higher: more alike);
- ``centrality_margin``: the selected candidate's centrality minus the mean centrality of the other candidates of
  its pool (the method's own utility), averaged over prompts whose target is a candidate;
- ``perplexity``: exp of the mean negative log-likelihood per token of the original responses given their prompts
  (rendered with the chat template, generation prompt on; the response's tokens and then the end-of-turn token),
  pooled over every token of the held-out prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.inference import free_memory, load_hf


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct word n-grams / all word n-grams of one pool's texts; None when they hold no n-gram."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def pair_means(sim: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(P,) mean of sim[p, j, k] over the ordered pairs j != k of valid members; NaN for a pool of fewer than two.
    sim (P, K, K), valid (P, K)."""
    pair = valid[:, :, None] & valid[:, None, :]
    idx = np.arange(sim.shape[1])
    pair[:, idx, idx] = False
    count = pair.sum((1, 2))
    total = np.where(pair, sim.astype(np.float64), 0.0).sum((1, 2))
    return np.divide(total, count, out=np.full(len(count), np.nan), where=count > 0)


def centrality_margin(centrality: np.ndarray, valid: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(P,) the target candidate's centrality minus the mean of the other valid candidates'; NaN where the target is
    no candidate (-1: the original, a dropped prompt) or the pool has no other member. centrality (P, n), valid (P, n),
    target (P,) candidate indices."""
    out = np.full(len(target), np.nan)
    for p, t in enumerate(target):
        if t < 0 or not valid[p, t]:
            continue
        others = [centrality[p, k] for k in range(centrality.shape[1]) if k != t and valid[p, k]]
        if others:
            out[p] = float(centrality[p, t]) - float(np.mean(others))
    return out


def _mean(values: np.ndarray | list[float | None]) -> float | None:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 5) if len(v) else None


def pool_values(
    texts: list[list[str]], valid: np.ndarray, cosine: np.ndarray, chrf: np.ndarray
) -> dict[str, np.ndarray]:
    """The diversity monitors of each pool, (P,) arrays, NaN for a pool of fewer than two non-empty candidates:
    distinct_1, distinct_2, pool_cosine and self_chrf (chrF in 0..1 here; select.json reports it x100). texts (P
    rows of n candidates), valid (P, n) non-empty, cosine and chrf (P, n, n) pairwise utilities (chrF in 0..1)."""
    dist: dict[int, list[float]] = {1: [], 2: []}
    for row, keep in zip(texts, valid, strict=True):
        members = [t for t, ok in zip(row, keep, strict=True) if ok]
        for n in dist:
            v = distinct_n(members, n) if len(members) >= 2 else None
            dist[n].append(np.nan if v is None else v)
    return {
        "distinct_1": np.array(dist[1], dtype=float),
        "distinct_2": np.array(dist[2], dtype=float),
        "pool_cosine": pair_means(cosine, valid),
        "self_chrf": pair_means(chrf, valid),
    }


def pool_monitors(
    texts: list[list[str]],
    valid: np.ndarray,
    cosine: np.ndarray,
    chrf: np.ndarray,
    centrality: np.ndarray,
    target: np.ndarray,
) -> dict[str, Any]:
    """The candidate monitors of one round's pools (`pool_values` averaged over pools of two or more, and the
    target's centrality margin): centrality (P, n) and target (P,) of the method."""
    per_pool = pool_values(texts, valid, cosine, chrf)
    chrf_mean = _mean(per_pool["self_chrf"])
    return {
        "pools": int((valid.sum(axis=1) >= 2).sum()),
        "distinct_1": _mean(per_pool["distinct_1"]),
        "distinct_2": _mean(per_pool["distinct_2"]),
        "pool_cosine": _mean(per_pool["pool_cosine"]),
        "self_chrf": round(chrf_mean * 100, 3) if chrf_mean is not None else None,
        "centrality_margin": _mean(centrality_margin(centrality, valid, target)),
    }


def response_tokens(tok: Any, messages: list[dict], response: str) -> tuple[list[int], int]:
    """(ids, number of response tokens at the end): the prompt rendered with the chat template (generation prompt
    on), then the response's tokens and the end-of-turn token."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = [*tok(response, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return p_ids + r_ids, len(r_ids)


def perplexity(folder: Path, prompts: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """Perplexity of `prompts`' original responses under the model in `folder` (float32, one sequence at a time:
    exact and cheap for a held-out slice): {"perplexity", "tokens", "prompts", "skipped_long"} (a sequence longer
    than max_length is left out and counted)."""
    import torch

    model, tok = load_hf(folder, "float32", padding_side="right")
    nll, count, used, skipped = 0.0, 0, 0, 0
    try:
        for p in prompts:
            ids, n_resp = response_tokens(tok, p["messages"], p["original"])
            if len(ids) > max_length:
                skipped += 1
                continue
            x = torch.tensor([ids], device=model.device)
            with torch.inference_mode():
                logits = model(input_ids=x).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
            nll -= float(logp[-n_resp:].sum())
            count += n_resp
            used += 1
    finally:
        del model
        free_memory()
    ppl = math.exp(nll / count) if count else None
    return {
        "perplexity": round(ppl, 4) if ppl is not None else None,
        "tokens": count,
        "prompts": used,
        "skipped_long": skipped,
    }
