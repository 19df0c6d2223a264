"""Rank correlations and their confidence intervals (how well a score predicts an outcome)."""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

__all__ = ["correlation", "fisher_z_interval", "bootstrap_interval", "kendall_tau_b", "noise_ceiling", "ranks",
           "reliability", "spearman"]

# Standard-error factors of atanh(r) for rank correlations (Fieller, Hartley and Pearson 1957):
# se = sqrt(FACTOR / (n - OFFSET)).
_FISHER_SE = {"spearman": (1.06, 3), "kendall": (0.437, 4)}


def ranks(v: Sequence[float]) -> list[float]:
    """1-based ranks of ``v``; tied values share the average of the ranks they span (``[5, 1, 5] -> [2.5, 1, 2.5]``)."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson's r of the average ranks (so ties are handled); NaN when either side is
    constant or n < 2."""
    if len(x) != len(y):
        raise ValueError("spearman needs sequences of equal length")
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)) over all n0 = n(n-1)/2 pairs.

    A pair tied in x (or y) is neither concordant nor discordant and counts in ``ties_x`` (``ties_y``); tau-b is 1
    for any strictly increasing relation even with ties. NaN when either side is constant or n < 2. O(n^2): meant
    for the few dozen calibration sets of a benchmark.
    """
    if len(x) != len(y):
        raise ValueError("kendall_tau_b needs sequences of equal length")
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                tie_x += 1
            if dy == 0:
                tie_y += 1
            if dx * dy > 0:
                conc += 1
            elif dx * dy < 0:
                disc += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - tie_x) * (n0 - tie_y)) if n >= 2 else 0.0
    return (conc - disc) / denom if denom > 0 else float("nan")


_METHODS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {"spearman": spearman,
                                                                            "kendall": kendall_tau_b}


def fisher_z_interval(r: float, n: int, method: str = "spearman", level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a rank correlation from the Fisher transform: tanh(atanh(r) -+ z * se).

    ``se = sqrt(1.06 / (n - 3))`` for Spearman and ``sqrt(0.437 / (n - 4))`` for Kendall (Fieller, Hartley and
    Pearson 1957), z the normal quantile of ``level``. (NaN, NaN) when n is too small or r is NaN; |r| = 1 gives
    the point (r, r).
    """
    factor, offset = _FISHER_SE[method]
    if n <= offset or r != r:
        return float("nan"), float("nan")
    if abs(r) >= 1:
        return r, r
    z = _normal_quantile(0.5 + level / 2)
    se = math.sqrt(factor / (n - offset))
    c = math.atanh(r)
    return math.tanh(c - z * se), math.tanh(c + z * se)


def bootstrap_interval(x: Sequence[float], y: Sequence[float], method: str = "spearman", level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a rank correlation: resample the (x, y) pairs with replacement.

    Resamples where the statistic is undefined (one side constant) are dropped. Seeded, so the same data give the
    same interval. (NaN, NaN) when fewer than 3 pairs.
    """
    n = len(x)
    if n < 3:
        return float("nan"), float("nan")
    stat = _METHODS[method]
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        v = stat([x[i] for i in pick], [y[i] for i in pick])
        if v == v:
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    values.sort()
    lo = values[int(math.floor((1 - level) / 2 * (len(values) - 1)))]
    hi = values[int(math.ceil((1 + level) / 2 * (len(values) - 1)))]
    return lo, hi


def correlation(x: Sequence[float], y: Sequence[float], level: float = 0.95, resamples: int = 2000,
                seed: int = 0) -> dict[str, float | int | list[float]]:
    """Spearman and Kendall tau-b of (x, y) with Fisher-z and bootstrap intervals, as a JSON-ready dict."""
    out: dict[str, float | int | list[float]] = {"n": len(x)}
    for name, fn in _METHODS.items():
        r = fn(x, y)
        out[name] = r
        out[f"{name}_fisher"] = list(fisher_z_interval(r, len(x), name, level))
        out[f"{name}_bootstrap"] = list(bootstrap_interval(x, y, name, level, resamples, seed))
    return out


def reliability(groups: Sequence[Sequence[float]], aligned: bool = False) -> float:
    """Share of the variance of the group means that is not replicate noise (the reliability of the means).

    Each group holds replicate measurements of one item (a calibration set's top-1 over seeds). With ``s_b^2`` the
    sample variance of the group means and ``s_w^2`` the replicate noise variance, the expected variance of a mean
    of ``n`` replicates is ``sigma_between^2 + sigma_w^2 / n``, so::

        R = (s_b^2 - s_w^2 / n) / s_b^2, clipped to [0, 1]

    ``s_w^2`` is the mean within-group sample variance and ``n`` the harmonic mean of the group sizes. With
    ``aligned=True`` replicate ``j`` of every group was taken under the same condition (the same seed), so an
    effect of replicate ``j`` shared by all groups moves every mean alike and changes no ranking; ``s_w^2`` is
    then the two-way residual ``sum_ij (x_ij - m_i. - m_.j + m..)^2 / ((k - 1)(n - 1))`` (groups of equal size).
    NaN when there are fewer than two groups, no replicates, or the means do not vary.
    """
    groups = [list(g) for g in groups if len(g)]
    means = [sum(g) / len(g) for g in groups]
    reps = [g for g in groups if len(g) > 1]
    if len(means) < 2 or not reps:
        return math.nan
    mu = sum(means) / len(means)
    s_b = sum((m - mu) ** 2 for m in means) / (len(means) - 1)
    if s_b == 0:
        return math.nan
    if aligned:
        n = len(groups[0])
        if any(len(g) != n for g in groups):
            raise ValueError("aligned replicates need groups of equal size")
        col = [sum(g[j] for g in groups) / len(groups) for j in range(n)]
        s_w = sum((g[j] - m - col[j] + mu) ** 2 for g, m in zip(groups, means) for j in range(n))
        s_w /= (len(groups) - 1) * (n - 1)
    else:
        s_w = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) / (len(g) - 1) for g in reps) / len(reps)
        n = len(groups) / sum(1 / len(g) for g in groups)
    return min(1.0, max(0.0, (s_b - s_w / n) / s_b))


def noise_ceiling(groups: Sequence[Sequence[float]], aligned: bool = False) -> float:
    """The largest correlation any noise-free predictor can reach with the group means: ``sqrt(reliability)``
    (Spearman's correction for attenuation). A target correlation above it is not measurable with these
    replicates: more seeds, or items that differ more, are needed."""
    r = reliability(groups, aligned)
    return math.sqrt(r) if r == r else math.nan


def _normal_quantile(p: float) -> float:
    """Standard normal quantile by bisection on erf (exact to ~1e-12; no SciPy needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
