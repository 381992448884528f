"""The judge as a selection utility (selection.utility judge): the stage-05 judge client scores a prompt's pool,
so MBR-style selection picks by the judge instead of by similarity. Every request goes through the client's
cache (`.cache/selftrain/judge/`), so a rerun, or another method on the same pool, asks nothing again.

- ``pointwise``: every valid pool member is rated once with the quality rubric; its score s_j (one criterion or
  the mean of the five) becomes ``sim[p, j, k] = s_j`` for every k, so a member's centrality (its mean utility
  against the rest of the pool) is its own score. K requests a prompt.
- ``pairwise``: the judge states a preference 1..5 between answers A and B (1: A clearly better, 5: B clearly
  better), asked in both orders against position bias. ``sim[p, j, k]`` is j's probability of beating k: the
  mean of (5 - s)/4 with j shown as A and (s - 1)/4 with j shown as B, so sim[j, k] + sim[k, j] = 1 and a
  member's centrality is its mean win rate (Borda). K*(K-1) requests a prompt.

An item the judge leaves unscored (API error, refusal, unparsable after `judge.reask` re-asks) counts as the
lowest score (pointwise, 1) or as no preference (pairwise, 0.5), and is counted in the stats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from selftrain.config import JudgeConfig, JudgeUtilityConfig
from selftrain.graders.clients import LocalJudge, RemoteJudge, ask, judge_messages, load_rubric
from selftrain.graders.parse import LABELS

PAIRWISE_PLACEHOLDERS = ("question", "answer_a", "answer_b")


def request_count(valid: np.ndarray, mode: str) -> int:
    """Requests the judge utility sends for these pools (before re-asks; cached ones included)."""
    k = valid.sum(1).astype(int)
    return int(k.sum()) if mode == "pointwise" else int((k * (k - 1)).sum())


def judge_sim(
    judge: LocalJudge | RemoteJudge,
    jcfg: JudgeConfig,
    ucfg: JudgeUtilityConfig,
    questions: list[str],
    pools: list[list[str]],
    valid: np.ndarray,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """sim (P, K, K) over each prompt's pool (see the module docstring) and request stats."""
    P, K = valid.shape
    sim = np.zeros((P, K, K), dtype=np.float32)
    expected = jcfg.scoring == "expected"
    if ucfg.mode == "pointwise":
        rubric = load_rubric(jcfg.rubric_dir, jcfg.language, "quality")
        labels = LABELS[jcfg.language]["quality"]
        jobs = [(p, j) for p in range(P) for j in range(K) if valid[p, j]]
        reqs = [(judge_messages(rubric, {"prompt": questions[p]}, pools[p][j]), labels) for p, j in jobs]
        res = ask(judge, reqs, jcfg.reask, expected, progress)
        score = np.ones((P, K), dtype=np.float32)
        for (p, j), r in zip(jobs, res, strict=True):
            if r["status"] == "ok":
                s = r["scores"]
                score[p, j] = np.mean(list(s.values())) if ucfg.criterion == "mean" else s[ucfg.criterion]
        sim[:] = score[:, :, None]
    else:
        rubric = load_rubric(jcfg.rubric_dir, jcfg.language, "pairwise", PAIRWISE_PLACEHOLDERS)
        labels = LABELS[jcfg.language]["pairwise"]
        pairs = [
            (p, a, b) for p in range(P) for a in range(K) for b in range(K) if a != b and valid[p, a] and valid[p, b]
        ]
        fill = [rubric.format(question=questions[p], answer_a=pools[p][a], answer_b=pools[p][b]) for p, a, b in pairs]
        reqs = [([{"role": "user", "content": text}], labels) for text in fill]
        res = ask(judge, reqs, jcfg.reask, expected, progress)
        wins = np.zeros((P, K, K), dtype=np.float32)  # sum of j-beats-k probabilities from both orders
        seen = np.zeros((P, K, K), dtype=np.float32)
        for (p, a, b), r in zip(pairs, res, strict=True):
            if r["status"] != "ok":
                continue
            s = r["scores"]["preference"]
            wins[p, a, b] += (5.0 - s) / 4.0  # A = a preferred when s is low
            wins[p, b, a] += (s - 1.0) / 4.0
            seen[p, a, b] += 1.0
            seen[p, b, a] += 1.0
        sim = np.where(seen > 0, wins / np.maximum(seen, 1.0), 0.5).astype(np.float32)
    status = [r["status"] for r in res]
    stats = {
        "mode": ucfg.mode,
        "requests": len(reqs),
        "judge_calls": sum(len(r["outputs"]) for r in res),
        "cached_calls": sum(bool(o.get("cached")) for r in res for o in r["outputs"]),
        "unscored": sum(s != "ok" for s in status),
        "status": {s: status.count(s) for s in sorted(set(status))},
    }
    return sim, stats
