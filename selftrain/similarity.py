"""Pairwise utilities over each prompt's pool (candidates + original) for MBR-style selection (stage 02).

Every utility returns ``sim`` of shape (P, K, K) with ``sim[p, j, k]`` the utility of member j measured against
member k (for an asymmetric one such as chrF: j the hypothesis, k the reference); the selection methods then take
a member's mean utility against the rest of its pool (`select.centrality_from_sim`).

- ``self-embedding``: cosine of the model's own pooled hidden states, optionally centred first: raw cosines of
  a decoder's states sit in a narrow band (0.74-0.99 on the demo), one common direction dominating. ``pool``
  subtracts each prompt's pool mean (valid members only), ``corpus`` the mean over every valid member of every
  prompt; the vectors are L2-normalised again after.
- ``chrf``: sentence chrF (character n-grams 1..6, beta 2, whitespace removed: sacrebleu's defaults), the lexical
  MBR utility, in [0, 1].
"""

from __future__ import annotations

from collections import Counter

import numpy as np

CENTERING = ("none", "pool", "corpus")


def centre(emb: np.ndarray, valid: np.ndarray, mode: str) -> np.ndarray:
    """emb (P, K, d) normalised, valid (P, K): subtract the pool's or the corpus's mean of valid members, then
    L2-normalise again (a zero vector stays zero). 'none' returns emb unchanged."""
    if mode == "none":
        return emb
    if mode not in CENTERING:
        raise ValueError(f"unknown centring '{mode}' (known: {', '.join(CENTERING)})")
    e = emb.astype(np.float32, copy=True)
    w = valid[..., None].astype(np.float32)
    if mode == "pool":
        mean = (e * w).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1.0)
    else:
        mean = (e * w).sum((0, 1), keepdims=True) / max(float(w.sum()), 1.0)
    e = (e - mean) * w
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    return np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)


def cosine_sim(emb: np.ndarray) -> np.ndarray:
    """(P, K, d) normalised -> (P, K, K) cosines."""
    e = emb.astype(np.float32, copy=False)
    return np.matmul(e, e.transpose(0, 2, 1))


def chrf_pool(texts: list[str], order: int = 6, beta: float = 2.0) -> np.ndarray:
    """(K, K) sentence chrF / 100 with texts[j] as hypothesis and texts[k] as reference, as sacrebleu's CHRF()
    computes it (effective-order averaging of precision and recall over the orders both sides have)."""
    lines = ["".join(t.split()) for t in texts]
    K = len(lines)
    hyp = np.zeros((order, K))
    match = np.zeros((order, K, K))
    for n in range(1, order + 1):
        counts = [Counter(s[i : i + n] for i in range(len(s) - n + 1)) for s in lines]
        vocab: dict[str, int] = {}
        for c in counts:
            for g in c:
                vocab.setdefault(g, len(vocab))
        m = np.zeros((K, max(len(vocab), 1)), dtype=np.int32)
        for j, c in enumerate(counts):
            for g, v in c.items():
                m[j, vocab[g]] = v
        hyp[n - 1] = m.sum(1)
        match[n - 1] = np.minimum(m[:, None, :], m[None, :, :]).sum(-1)
    h = hyp[:, :, None]  # the hypothesis (row j) side
    r = hyp[:, None, :]  # the reference (column k) side
    both = (h > 0) & (r > 0)
    prec = np.where(both, match / np.maximum(h, 1), 0.0)
    rec = np.where(both, match / np.maximum(r, 1), 0.0)
    eff = both.sum(0)
    avg_p = np.divide(prec.sum(0), eff, out=np.zeros((K, K)), where=eff > 0)
    avg_r = np.divide(rec.sum(0), eff, out=np.zeros((K, K)), where=eff > 0)
    f2 = beta**2
    den = f2 * avg_p + avg_r
    return np.divide((1 + f2) * avg_p * avg_r, den, out=np.zeros((K, K)), where=den > 0)


def chrf_sim(texts: list[list[str]], progress: bool = False) -> np.ndarray:
    """(P, K, K) chrF utilities of every prompt's pool (texts: P rows of K strings)."""
    from tqdm.auto import tqdm

    return np.stack([chrf_pool(row) for row in tqdm(texts, desc="chrF", disable=not progress)]).astype(np.float32)
