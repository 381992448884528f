"""Selection utilities against brute-force references: chrF against sacrebleu pair by pair, centring against its
definition, and `central` under chrF choosing the candidate with the highest mean chrF to the rest."""

from __future__ import annotations

import numpy as np
import pytest
from sacrebleu.metrics import CHRF

from selftrain.select import centrality, centrality_from_sim, select
from selftrain.select.similarity import centre, chrf_pool, chrf_sim, cosine_sim

WORDS = "the a cat dog sat ran on under mat rug quickly slowly big small red".split()


def _texts(rng: np.random.Generator, k: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(0, 9))) + rng.choice(["", ".", "!"]) for _ in range(k)]


def test_chrf_pool_equals_sacrebleu_sentence_chrf() -> None:
    rng = np.random.default_rng(0)
    chrf = CHRF()
    for _ in range(5):
        texts = _texts(rng, 6)
        ref = np.array([[chrf.sentence_score(h, [r]).score / 100 for r in texts] for h in texts])
        assert np.allclose(chrf_pool(texts), ref, atol=1e-9)


def test_centring_matches_its_definition() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(4, 5, 8)) + 3.0  # a shared offset: the anisotropy centring removes
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    valid = rng.random((4, 5)) > 0.3
    for mode in ("pool", "corpus"):
        got = centre(emb, valid, mode)
        for p in range(4):
            members = emb[valid] if mode == "corpus" else emb[p][valid[p]]
            mean = members.mean(0) if len(members) else np.zeros(8)
            for k in range(5):
                want = np.zeros(8)
                if valid[p, k]:
                    want = emb[p, k] - mean
                    want = want / np.linalg.norm(want)
                assert np.allclose(got[p, k], want, atol=1e-5)
    assert centre(emb, valid, "none") is emb
    raw = cosine_sim(emb)[valid[:, :, None] & valid[:, None, :]]
    cen = cosine_sim(centre(emb, valid, "pool"))[valid[:, :, None] & valid[:, None, :]]
    assert raw.min() > 0.7 and cen.min() < 0  # the narrow band opens up
    with pytest.raises(ValueError, match="unknown centring"):
        centre(emb, valid, "mean")


def test_centrality_from_sim_equals_the_embedding_path() -> None:
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(30, 6, 8))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    mask = rng.random((30, 6)) > 0.2
    assert np.allclose(centrality_from_sim(cosine_sim(emb), mask), centrality(emb, mask), equal_nan=True, atol=1e-6)
    valid = mask[:, :5]
    for method in ("central", "drop-low", "fallback-original"):
        a, b = select(emb, valid, method), select(None, valid, method, sim=cosine_sim(emb))
        assert np.array_equal(a["target"], b["target"]) and np.array_equal(a["decision"], b["decision"])


def test_central_under_chrf_picks_the_highest_mean_chrf() -> None:
    rng = np.random.default_rng(3)
    rows = [_texts(rng, 4) + ["the cat sat on the mat."] for _ in range(20)]
    valid = np.array([[bool(t.strip()) for t in r[:4]] for r in rows])
    sel = select(None, valid, "central", sim=chrf_sim(rows))
    chrf = CHRF()
    for p, r in enumerate(rows):
        pool = [k for k in range(4) if valid[p, k]]
        if not pool:
            assert sel["target"][p] == -1
            continue
        means = [np.mean([chrf.sentence_score(r[j], [r[k]]).score for k in pool if k != j] or [0.0]) for j in pool]
        tied_best = [pool[i] for i, m in enumerate(means) if abs(m - max(means)) < 1e-4]
        assert sel["target"][p] in tied_best
