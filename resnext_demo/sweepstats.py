"""Statistics of a cardinality sweep on one test set (numpy and the standard library only; no scipy).

- `mean_ci`: mean and 95 % confidence half-width (Student t) of the per-seed accuracies of one model.
- `paired_t`: each C against C = 1 over seeds (same seed = same data order and augmentation), two-sided.
- `mcnemar`: the same comparison image by image, on predictions pooled over the seed pairs (b = images only C
  gets right, c = only C = 1 gets right; exact binomial for small b + c, else chi-square with continuity
  correction). Pooling treats (seed, image) pairs as independent, which overstates the evidence when the
  same images are hard for every seed: read it beside the paired t-test, not instead of it.
- `min_detectable`: the smallest true difference the paired design detects with the given power.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_ppf(q: float, df: int) -> float:
    """Quantile of Student's t (q > 0.5), by bisection on the two-sided tail."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) / 2 > 1 - q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float] | np.ndarray, level: float = 0.95) -> dict:
    """n, mean, sample sd and the CI half-width of the mean (nan with fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = t_ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": float(v.mean()), "sd": sd, "ci95": half}


def paired_t(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> dict:
    """Paired t-test of a - b (same seeds in the same order): mean difference, its 95 % CI, t, two-sided p."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    out = {"n": n, "diff": float(d.mean()), "sd_diff": float(d.std(ddof=1)) if n > 1 else float("nan")}
    if n < 2:
        return {**out, "ci95": float("nan"), "t": float("nan"), "p": float("nan")}
    se = out["sd_diff"] / math.sqrt(n)
    t = out["diff"] / se if se > 0 else (0.0 if out["diff"] == 0 else math.copysign(math.inf, out["diff"]))
    p = t_sf2(t, n - 1) if math.isfinite(t) else 0.0
    return {**out, "ci95": t_ppf(0.975, n - 1) * se, "t": t, "p": p}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's test on paired correctness arrays (any shape, pooled): b = a right & b wrong, c = the reverse."""
    a, bb = np.asarray(correct_a, bool).ravel(), np.asarray(correct_b, bool).ravel()
    b, c = int((a & ~bb).sum()), int((~a & bb).sum())
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "stat": 0.0, "p": 1.0, "method": "none"}
    if n <= 50:  # exact: b ~ Binomial(n, 1/2) under the null
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return {"b": b, "c": c, "stat": float(k), "p": min(1.0, 2 * tail), "method": "exact binomial"}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "stat": stat, "p": math.erfc(math.sqrt(stat / 2)), "method": "chi2, continuity corrected"}


def min_detectable(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test over n seeds detects with `power`, given the
    sd of the per-seed differences: (t_{1-alpha/2} + t_{power}) * sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd_diff):
        return float("nan")
    return (t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) * sd_diff / math.sqrt(n)


def z_min_detectable(p_discordant: float, n_pairs: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The same for McNemar (normal approximation): difference in accuracy detectable when a fraction
    p_discordant of the n_pairs (seed, image) pairs disagree."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt(p_discordant / n_pairs) if n_pairs else float("nan")
