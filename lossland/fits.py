"""Fits of a measured quantity against the dataset size N, with intervals over seeds.

`fit_scaling` is what the dataset-size sweep (experiments/sweep_n.py, claims C1
and C2) uses to say whether, say, the final gradient norm grows with N: the
OLS slope of the per-N mean against log N, a bootstrap interval over seeds and
a Student-t interval over the scatter of the means, and the same over the
largest sizes (the "tail"). The nan-tolerant helpers read record values that
may be missing, None or non-finite.
"""

from __future__ import annotations

import math

import numpy as np


def finite_or_nan(value) -> float:
    """A record value as a float; NaN for None, booleans, strings and non-finite numbers."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else float("nan")


def nanmax(values) -> float:
    """The largest finite value (NaN if there is none)."""
    values = [v for v in map(finite_or_nan, values) if math.isfinite(v)]
    return max(values) if values else float("nan")


def nanmean(values) -> float:
    """The mean of the finite values (NaN if there are none)."""
    values = [v for v in map(finite_or_nan, values) if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def nanmedian(values) -> float:
    """The median of the finite values (NaN if there are none)."""
    values = [v for v in map(finite_or_nan, values) if math.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def fit_scaling(n_values, values, *, scale: str = "log", num_bootstrap: int = 2000,
                confidence: float = 0.95, seed: int = 0) -> dict:
    """Slope of y against N with an interval that accounts for seeds and for scatter.

    Args:
      n_values: (K,) sizes N, increasing.
      values: (K, S) the quantity per N and seed (NaN = missing).
      scale: "log" fits log y on log N (y ∝ N^slope; y ≤ 0 dropped);
        "linear" fits y on log10 N (change per decade).
    The point estimate is the OLS slope of the per-N mean (of log y, or y) over
    seeds. Two intervals are computed:
      * boot_ci: bootstrap over seeds. Each replicate resamples, independently at
        every N, that N's seeds with replacement; the resampled means are
        rescaled by √(k/(k−1)) about the observed mean, the usual correction for
        the bootstrap's underdispersion with few (k) seeds; percentile interval.
      * ols_ci: the Student-t interval of the OLS slope of the K per-N means, which
        also counts scatter of the means about the power law.
    ci (used by the verdicts) is their hull, so neither source of error is ignored.
    The tail fit repeats all this over the largest max(4, ⌈K/2⌉) sizes when K ≥ 5.
    """
    n = np.asarray(n_values, np.float64)
    y = np.array(values, np.float64)
    if scale == "log":
        y = np.log(np.where(y > 0, y, np.nan))
    x = np.log(n) if scale == "log" else np.log10(n)
    per_n = [row[np.isfinite(row)] for row in y]
    keep = np.array([len(v) > 0 for v in per_n], bool)
    groups = [v for v in per_n if len(v)]
    nan = float("nan")
    out = {"scale": scale, "n": [int(v) for v in n[keep]], "num_n": int(keep.sum()),
           "num_seeds": int(min((len(v) for v in groups), default=0)),
           "center": [float(np.exp(v.mean()) if scale == "log" else v.mean()) for v in groups]}
    out.update(slope_intervals(x[keep], groups, num_bootstrap, confidence, seed))
    k = len(groups)
    if k >= 5:
        m = max(4, math.ceil(k / 2))
        tail = slope_intervals(x[keep][-m:], groups[-m:], num_bootstrap, confidence, seed + 1)
        out.update({f"tail_{key}": value for key, value in tail.items()})
        out["tail_n_min"] = int(n[keep][-m])
    else:
        out.update({f"tail_{key}": nan for key in slope_intervals(x[:0], [], 0, confidence, 0)})
        out["tail_n_min"] = None
    return out


def slope_intervals(x, groups, num_bootstrap, confidence, seed) -> dict:
    import scipy.stats

    nan = float("nan")
    out = dict(slope=nan, ci_low=nan, ci_high=nan, boot_ci_low=nan, boot_ci_high=nan,
               ols_ci_low=nan, ols_ci_high=nan)
    if len(x) < 2:
        return out
    xc = x - x.mean()
    sxx = float(xc @ xc)
    means = np.array([g.mean() for g in groups])
    slope = float(xc @ (means - means.mean()) / sxx)
    out["slope"] = slope
    alpha = (1 - confidence) / 2
    if len(x) >= 3:
        residual = means - means.mean() - slope * xc
        stderr = math.sqrt(float(residual @ residual) / (len(x) - 2) / sxx)
        half = float(scipy.stats.t.ppf(1 - alpha, len(x) - 2)) * stderr
        out.update(ols_ci_low=slope - half, ols_ci_high=slope + half)
    if min(len(g) for g in groups) >= 2:   # one seed somewhere: nothing to resample
        rng = np.random.default_rng(seed)
        boot = np.stack([g.mean() + math.sqrt(len(g) / (len(g) - 1)) *
                         (g[rng.integers(0, len(g), size=(num_bootstrap, len(g)))].mean(axis=1)
                          - g.mean()) for g in groups], axis=1)          # (B, K)
        slopes = (boot - boot.mean(axis=1, keepdims=True)) @ xc / sxx
        low, high = np.quantile(slopes, [alpha, 1 - alpha])
        out.update(boot_ci_low=float(low), boot_ci_high=float(high))
    lows = [v for v in (out["boot_ci_low"], out["ols_ci_low"]) if math.isfinite(v)]
    highs = [v for v in (out["boot_ci_high"], out["ols_ci_high"]) if math.isfinite(v)]
    if math.isfinite(out["boot_ci_low"]) and lows:   # an interval needs the seed bootstrap
        out.update(ci_low=min(lows), ci_high=max(highs))
    return out
