"""Statistics shared by the stages and the figures: bootstrap intervals, paired differences against a baseline
(bootstrap interval, sign-flip permutation p-value, Holm's correction) and a length-controlled mean."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean (nan for fewer than two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-item differences (method minus baseline on the same items) and its percentile 95% interval:
    items are resampled together, so what both runs share cancels."""
    d = np.asarray(diff, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = bootstrap_ci(d, n_boot, seed)
    return float(d.mean()), lo, hi


def permutation_p(diff: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of a zero mean difference: under the null each item's two scores
    are exchangeable, so each difference's sign is a coin flip. (1 + hits) / (1 + n_perm): never 0."""
    d = np.asarray(diff, dtype=float)
    if len(d) == 0:
        return float("nan")
    obs = abs(d.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, len(d)))
    hits = int((np.abs((signs * d).mean(axis=1)) >= obs - 1e-12).sum())
    return (1 + hits) / (1 + n_perm)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment across methods (family-wise error); NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def length_controlled_means(scores: np.ndarray, lengths: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Mean score per group after a pooled linear adjustment for answer length: fit ``score = a + b * length``
    over every item of every group, then each group's mean of ``score - b * (length - overall mean length)``.
    Judges (and MBR) favour long answers; this asks what each group would score at the common mean length."""
    s, n, g = (np.asarray(x) for x in (scores, lengths, groups))
    ok = ~(np.isnan(s.astype(float)) | np.isnan(n.astype(float)))
    s, n, g = s[ok].astype(float), n[ok].astype(float), g[ok]
    b = float(np.polyfit(n, s, 1)[0]) if len(s) >= 3 and n.std() > 0 else 0.0
    adj = s - b * (n - n.mean())
    return {str(k): float(adj[g == k].mean()) for k in dict.fromkeys(g.tolist())}
