"""Statistics shared by the stages and the figures: bootstrap intervals, paired differences against a baseline
(bootstrap interval, sign-flip permutation p-value, Holm's correction and the levels it uses), a length-controlled mean,
and the power of a paired comparison (minimum detectable difference, items needed for a named difference)."""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------------------------------- power
# The power of a paired comparison, read as a two-sided paired t test on the per-item differences (the permutation
# test of `permutation_p` has nearly the same power on these sizes; tests/test_power.py checks both by simulation):
# power = P(|T| > t_crit) with T noncentral t (df n - 1, noncentrality difference * sqrt(n) / sd), exactly what
# statsmodels' TTestPower computes. NaN wherever the inputs give no answer (fewer than two items, no spread).

POWER = 0.8  # the power every minimum detectable difference and sample size is stated at
ALPHA = 0.05  # the family-wise level Holm's correction keeps


def paired_t_power(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t test at level `alpha` to detect a true mean difference `difference` over `n`
    items whose differences have standard deviation `sd`."""
    from scipy.stats import nct
    from scipy.stats import t as student_t

    if not (n >= 2 and sd > 0 and 0 < alpha < 1) or math.isnan(difference):
        return math.nan
    df, nc = n - 1, abs(difference) * math.sqrt(n) / sd
    crit = student_t.ppf(1 - alpha / 2, df)
    return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc))


def min_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the paired t test over `n` items detects with probability `power` at level
    `alpha`, in the units of the scores (sd: the standard deviation of the per-item differences)."""
    from scipy.optimize import brentq

    if not (n >= 2 and sd > 0 and 0 < alpha < 1 and alpha < power < 1):
        return math.nan
    hi = sd / math.sqrt(n)
    while paired_t_power(hi, sd, n, alpha) < power:  # the root lies below hi once hi's power passes the target
        hi *= 2
    return float(brentq(lambda d: paired_t_power(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-10 * hi))


def items_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER, most: int = 10**9) -> float:
    """The fewest items (at least 2) whose paired t test detects `difference` with probability `power` at level
    `alpha`, given the per-item differences' standard deviation `sd`; NaN without an answer (no spread, no
    difference, more than `most`)."""
    if not (sd > 0 and abs(difference) > 0 and 0 < alpha < 1 and alpha < power < 1):
        return math.nan
    if paired_t_power(difference, sd, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4  # power grows with n: lo falls short, find an hi that reaches it, then bisect
    while paired_t_power(difference, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > most:
            return math.nan
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if paired_t_power(difference, sd, mid, alpha) >= power else (mid, hi)
    return hi


def holm_levels(pvalues: list[float], alpha: float = ALPHA) -> list[float]:
    """The level Holm's step-down compares each p-value with: alpha / (m - rank) for the rank of its p-value among
    the m that are not NaN (0: the smallest; ties in the order given, as `holm`); NaN stays NaN. The first (and
    strictest) is alpha / m, Bonferroni's: the level a study plans with before its p-values exist."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    for rank, i in enumerate(order):
        out[i] = alpha / (len(order) - rank)
    return out.tolist()
