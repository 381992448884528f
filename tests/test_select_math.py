"""Unit tests of the selection maths and of every method's decisions on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from selftrain.select.stage import _records, centrality, select


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_centrality(emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    P, K, _ = emb.shape
    out = np.full((P, K), np.nan)
    for p in range(P):
        pool = [k for k in range(K) if mask[p, k]]
        for j in pool:
            others = [k for k in pool if k != j]
            if not others:
                out[p, j] = 0.0
                continue
            sims = [emb[p, j] @ emb[p, k] / (np.linalg.norm(emb[p, j]) * np.linalg.norm(emb[p, k])) for k in others]
            out[p, j] = np.mean(sims)
    return out


def test_centrality_matches_brute_force_on_random_embeddings() -> None:
    rng = np.random.default_rng(0)
    emb = _norm(rng.standard_normal((40, 7, 16))).astype(np.float32)
    mask = rng.random((40, 7)) > 0.25
    mask[0] = False
    mask[0, 3] = True  # a pool of one
    got = centrality(emb, mask, chunk=9)  # chunk boundary inside the batch
    want = brute_centrality(emb.astype(np.float64), mask)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-5)
    assert got[0, 3] == 0.0


def _case(cands: list[list[float]], original: list[float]) -> np.ndarray:
    return _norm(np.array([[*cands, original]], dtype=np.float32))


# Candidates 0,1 close together, candidate 2 an outlier; original far from all (ranks last).
CLUSTER = [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]
FAR = [-1.0, 0.2, -0.3]
NEAR = [0.95, 0.05, 0.1]


@pytest.mark.parametrize(
    "method, original, decision, target",
    [
        ("central", FAR, "central", 0),
        ("original", FAR, "original", -1),
        ("drop-low", FAR, "dropped", -1),
        ("fallback-original", FAR, "fallback", -1),
        ("drop-low", NEAR, "central", 0),
        ("fallback-original", NEAR, "central", 0),
    ],
)
def test_method_decisions(method: str, original: list[float], decision: str, target: int) -> None:
    sel = select(_case(CLUSTER, original), np.ones((1, 3), bool), method)
    assert sel["decision"][0] == decision
    assert sel["target"][0] == target
    if decision != "dropped":
        assert sel["rejected"][0] == 2  # the outlier is the least central candidate
    else:
        assert sel["rejected"][0] == -1


def test_original_rank_and_low_part() -> None:
    far = select(_case(CLUSTER, FAR), np.ones((1, 3), bool), "drop-low")
    near = select(_case(CLUSTER, NEAR), np.ones((1, 3), bool), "drop-low")
    assert far["original_rank"][0] == 4 and far["original_low"][0]
    assert near["original_rank"][0] <= 2 and not near["original_low"][0]
    # low_fraction controls the cut: with 0.25 only the last of 4 ranks is low, so rank 4 still is.
    assert select(_case(CLUSTER, FAR), np.ones((1, 3), bool), "drop-low", low_fraction=0.25)["original_low"][0]


def test_ties_pick_lowest_index_and_favour_the_original() -> None:
    same = [1.0, 0.0, 0.0]
    emb = _case([same, same, same], same)
    for method in ("central", "drop-low", "fallback-original"):
        sel = select(emb, np.ones((1, 3), bool), method)
        assert sel["target"][0] == 0
        assert sel["rejected"][0] == 0  # all tied: least central is also index 0
        assert sel["original_rank"][0] == 1  # a tie never pushes the original down
        assert sel["decision"][0] == "central"


def test_n_equals_one() -> None:
    emb = _case([[1.0, 0.0]], [0.0, 1.0])
    central = select(emb, np.ones((1, 1), bool), "central")
    assert central["decision"][0] == "central" and central["target"][0] == 0 and central["rejected"][0] == 0
    assert central["centrality"][0, 0] == 0.0  # a pool of one has nobody to compare with
    # candidates + original = 2: both have the same centrality, so the original ties for rank 1.
    drop = select(emb, np.ones((1, 1), bool), "drop-low")
    assert drop["original_rank"][0] == 1 and drop["decision"][0] == "central"


def test_empty_candidates_are_never_targets() -> None:
    emb = _case(CLUSTER, NEAR)
    valid = np.array([[False, True, True]])
    sel = select(emb, valid, "central")
    assert sel["target"][0] == 1
    none = select(emb, np.zeros((1, 3), bool), "central")
    assert none["decision"][0] == "no_candidates" and none["target"][0] == -1
    orig = select(emb, np.zeros((1, 3), bool), "original")
    assert orig["decision"][0] == "original" and orig["rejected"][0] == -1


def test_records_skip_and_count_identical_dpo_pairs() -> None:
    prompts = [
        {"id": "a", "messages": [{"role": "user", "content": "q"}], "original": "orig"},
        {"id": "b", "messages": [{"role": "user", "content": "q2"}], "original": "orig2"},
    ]
    texts = [["same", "same", "same"], ["x", "y", "z"]]
    same = [1.0, 0.0, 0.0]
    emb = np.concatenate([_case([same, same, same], same), _case(CLUSTER, FAR)])
    sel = select(emb, np.ones((2, 3), bool), "central")
    rows, sft, dpo, identical = _records(prompts, texts, sel)
    assert identical == 1 and len(dpo) == 1 and len(sft) == 2
    assert dpo[0]["chosen"][0]["content"] == "x" and dpo[0]["rejected"][0]["content"] == "z"
    assert sft[0]["completion"] == [{"role": "assistant", "content": "same"}]
    assert rows[1]["target"] == 0 and rows[1]["rejected"] == 2


def test_original_method_trains_on_the_original() -> None:
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "q"}], "original": "orig"}]
    sel = select(_case(CLUSTER, FAR), np.ones((1, 3), bool), "original")
    _, sft, dpo, _ = _records(prompts, [["x", "y", "z"]], sel)
    assert sft[0]["completion"][0]["content"] == "orig"
    assert dpo[0]["chosen"][0]["content"] == "orig" and dpo[0]["rejected"][0]["content"] == "z"


def test_methods_agree_on_random_batches() -> None:
    """Cross-check the vectorised choices against a per-prompt loop over the brute-force centrality."""
    rng = np.random.default_rng(1)
    emb = _norm(rng.standard_normal((30, 6, 8))).astype(np.float32)
    valid = rng.random((30, 5)) > 0.2
    for method in ("central", "drop-low", "fallback-original"):
        sel = select(emb, valid, method)
        with_orig = method != "central"
        mask = np.concatenate([valid, np.full((30, 1), with_orig)], axis=1)
        c = brute_centrality(emb.astype(np.float64), mask)
        for p in range(30):
            cands = [j for j in range(5) if valid[p, j]]
            if not cands:
                assert sel["decision"][p] == "no_candidates"
                continue
            best = max(cands, key=lambda j: (c[p, j], -j))
            if sel["decision"][p] == "central":
                assert sel["target"][p] == best
            full = brute_centrality(emb[p : p + 1].astype(np.float64), np.concatenate([valid[p : p + 1], [[True]]], 1))
            rank = 1 + sum(full[0, j] > full[0, 5] + 1e-6 for j in cands)
            assert sel["original_rank"][p] == rank


def test_candidate_pool_derived_from_full_pool_matches_direct() -> None:
    from selftrain.select.stage import _without_original

    rng = np.random.default_rng(2)
    emb = _norm(rng.standard_normal((50, 6, 12))).astype(np.float32)
    valid = rng.random((50, 5)) > 0.3
    full = centrality(emb, np.concatenate([valid, np.ones((50, 1), bool)], axis=1))
    direct = centrality(emb, np.concatenate([valid, np.zeros((50, 1), bool)], axis=1))
    derived = _without_original(emb, full, valid)
    np.testing.assert_array_equal(np.isnan(derived), np.isnan(direct))
    np.testing.assert_allclose(derived[~np.isnan(derived)], direct[~np.isnan(direct)], atol=1e-5)


# ------------------------------------------------------------------------------------------- control arms


def _pool(P: int = 50, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = _norm(rng.normal(size=(P, n + 1, 8)))
    valid = rng.random((P, n)) > 0.2
    valid[0] = False  # a prompt without candidates
    valid[1] = [True] + [False] * (n - 1)  # a prompt with one
    lengths = rng.integers(10, 500, size=(P, n))
    return emb, valid, lengths


def test_control_arms_pick_by_their_rule_only() -> None:
    emb, valid, lengths = _pool()
    for method in ("random", "longest", "shortest", "first"):
        sel = select(emb, valid, method, lengths=lengths, seed=5)
        t, r = sel["target"], sel["rejected"]
        assert sel["decision"][0] == "no_candidates" and t[0] == -1 and r[0] == -1
        assert t[1] == 0 and r[1] == -1  # one candidate: a target, no pair
        for p in range(2, len(valid)):
            ok = np.flatnonzero(valid[p])
            assert sel["decision"][p] == "control" and t[p] in ok and (r[p] in ok or len(ok) < 2) and r[p] != t[p]
            if method == "longest":
                assert lengths[p, t[p]] == lengths[p, ok].max() and lengths[p, r[p]] == lengths[p, ok].min()
            if method == "shortest":
                assert lengths[p, t[p]] == lengths[p, ok].min() and lengths[p, r[p]] == lengths[p, ok].max()
            if method == "first":
                assert t[p] == ok[0] and r[p] == ok[-1]
        assert np.array_equal(sel["original_rank"], select(emb, valid, "central")["original_rank"])  # diagnostics


def test_random_control_is_deterministic_under_its_seed_and_uniform() -> None:
    emb, valid, lengths = _pool(P=400, n=4, seed=1)
    valid[:] = True
    a = select(emb, valid, "random", seed=7)["target"]
    assert np.array_equal(a, select(emb, valid, "random", seed=7)["target"])
    assert not np.array_equal(a, select(emb, valid, "random", seed=8)["target"])
    counts = np.bincount(a, minlength=4)
    assert counts.min() > 70  # about 100 each of 400 (binomial sd about 9)


def test_n_prefix_is_the_selection_on_the_first_n_candidates() -> None:
    """Selecting at n=3 from a pool generated at n=6 equals selecting on a pool that only had candidates 0..2
    (and the original): what `selection.n` does with the shared generation."""
    emb, valid, lengths = _pool(P=60, n=6, seed=2)
    prefix_emb, prefix_valid = emb[:, [0, 1, 2, 6]], valid[:, :3]
    for method in ("central", "drop-low", "fallback-original"):
        a = select(prefix_emb, prefix_valid, method)
        b = select(np.concatenate([emb[:, :3], emb[:, 6:]], axis=1), valid[:, :3].copy(), method)
        assert np.array_equal(a["target"], b["target"]) and np.array_equal(a["decision"], b["decision"])
        assert (a["target"] < 3).all()
