"""Small, dependency-light statistics for comparing training methods over seeds.

Everything here is pure (no I/O, no global RNG state) so it can be unit tested
with constructed inputs.

Conventions
-----------
* ``std`` is always the *sample* standard deviation (``ddof=1``).  With fewer
  than two values it is undefined and reported as ``nan``.
* A paired comparison of method ``a`` against baseline ``b`` uses the per-seed
  differences ``d_i = a_i - b_i`` over the seeds both methods have.  For losses
  and bits-per-byte a *negative* difference means ``a`` is better.
* Degenerate t-tests are not passed to scipy (which would return ``nan``/``inf``
  together with runtime warnings); they are resolved explicitly and the reason
  is returned next to the p-value:

  ======================================  =========  ===========================
  case                                    p-value    reason
  ======================================  =========  ===========================
  fewer than 2 pairs                      ``nan``    ``REASON_TOO_FEW``
  all differences zero (identical runs)   ``1.0``    ``REASON_ALL_ZERO``
  constant, non-zero differences          ``nan``    ``REASON_CONSTANT``
  ======================================  =========  ===========================

  "Zero" and "constant" are judged with a relative tolerance of ``1e-12`` of
  the magnitude of the compared values, so floating-point noise from the
  subtraction does not turn a degenerate case into a spurious p-value.
  For constant non-zero differences the t statistic is infinite and the test
  carries no information about the spread, so no p-value is claimed; the mean
  difference and the (zero-width) bootstrap interval still describe the data.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import EUCLIDEAN_TWIN

__all__ = [
    "REASON_TOO_FEW",
    "REASON_ALL_ZERO",
    "REASON_CONSTANT",
    "summarize",
    "paired_ttest",
    "bootstrap_ci",
    "paired_comparison",
    "method_pairs",
]

REASON_TOO_FEW = "fewer than 2 paired seeds: t-test undefined (p = nan)"
REASON_ALL_ZERO = "all paired differences are zero: no evidence of a difference (p = 1.0)"
REASON_CONSTANT = (
    "paired differences are constant and non-zero (zero variance): t statistic is "
    "infinite and the t-test is undefined (p = nan); see mean difference / CI"
)

_REL_TOL = 1e-12

Number = Union[int, float]


def _as_1d(values: Iterable[Number]) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def summarize(values: Iterable[Optional[Number]]) -> Dict[str, float]:
    """Mean and sample standard deviation of the finite entries of ``values``.

    ``None`` and non-finite entries are ignored (they are counted in
    ``n_dropped``).  Returns ``{"n", "mean", "std", "min", "max", "n_dropped"}``;
    ``mean``/``min``/``max`` are ``nan`` when no finite value is left and
    ``std`` is ``nan`` when fewer than two are.
    """
    raw = [np.nan if v is None else float(v) for v in values]
    arr = np.asarray(raw, dtype=float)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    out: Dict[str, float] = {
        "n": n,
        "mean": float(finite.mean()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n >= 2 else math.nan,
        "min": float(finite.min()) if n else math.nan,
        "max": float(finite.max()) if n else math.nan,
        "n_dropped": int(arr.size - n),
    }
    return out


def _degenerate_reason(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> Optional[str]:
    if d.size < 2:
        return REASON_TOO_FEW
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b)), np.finfo(float).tiny))
    tol = _REL_TOL * scale
    if float(np.max(np.abs(d))) <= tol:
        return REASON_ALL_ZERO
    if float(np.ptp(d)) <= tol:
        return REASON_CONSTANT
    return None


def paired_ttest(a: Sequence[Number], b: Sequence[Number]) -> Dict[str, object]:
    """Two-sided paired t-test of ``a`` against ``b`` (``scipy.stats.ttest_rel``).

    ``a`` and ``b`` must have the same length and be aligned (same seed at the
    same index).  Returns ``{"t", "p_value", "df", "reason"}`` where ``reason``
    is ``None`` for a regular test and one of the ``REASON_*`` strings for the
    degenerate cases described in the module docstring.
    """
    a_arr, b_arr = _as_1d(a), _as_1d(b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_ttest needs equally long inputs, got {a_arr.size} and {b_arr.size}")
    d = a_arr - b_arr
    n = int(d.size)
    df = n - 1 if n >= 1 else 0
    reason = _degenerate_reason(a_arr, b_arr, d)
    if reason == REASON_TOO_FEW:
        return {"t": math.nan, "p_value": math.nan, "df": df, "reason": reason}
    if reason == REASON_ALL_ZERO:
        return {"t": 0.0, "p_value": 1.0, "df": df, "reason": reason}
    if reason == REASON_CONSTANT:
        return {"t": math.copysign(math.inf, float(d.mean())), "p_value": math.nan, "df": df, "reason": reason}

    from scipy import stats as _sps  # local import keeps module import cheap

    res = _sps.ttest_rel(a_arr, b_arr)
    return {"t": float(res.statistic), "p_value": float(res.pvalue), "df": df, "reason": None}


def bootstrap_ci(
    values: Sequence[Number],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    max_chunk_elements: int = 4_000_000,
) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Resamples ``values`` with replacement ``n_resamples`` times using
    ``numpy.random.default_rng(seed)`` (deterministic for a fixed seed),
    computes the mean of each resample (vectorised; processed in chunks of at
    most ``max_chunk_elements`` drawn indices to bound memory) and returns the
    ``(1-confidence)/2`` and ``(1+confidence)/2`` percentiles.

    Degenerate inputs: no values -> ``(nan, nan)``; a single value ``x`` ->
    ``(x, x)`` (every resample equals it).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    x = _as_1d(values)
    n = int(x.size)
    if n == 0:
        return (math.nan, math.nan)
    if n == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, int(max_chunk_elements) // n)
    means = np.empty(n_resamples, dtype=float)
    start = 0
    while start < n_resamples:
        stop = min(n_resamples, start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
        start = stop
    alpha = 1.0 - confidence
    lo, hi = np.percentile(means, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return (float(lo), float(hi))


def paired_comparison(
    a: Union[Mapping[object, Optional[Number]], Sequence[Number]],
    b: Union[Mapping[object, Optional[Number]], Sequence[Number]],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Dict[str, object]:
    """Paired comparison of method ``a`` against baseline ``b`` over seeds.

    ``a`` and ``b`` are either mappings ``seed -> value`` (paired on the seeds
    present in both with finite values; others are listed in
    ``dropped_seeds``) or equally long aligned sequences.

    Returns a JSON-serialisable dict::

        n, seeds, mean_diff, std_diff, t, df, p_value, p_value_reason,
        ci_low, ci_high, confidence, n_resamples, dropped_seeds

    where ``diff = a - b`` per seed, ``std_diff`` is the sample std of the
    differences, ``p_value`` comes from :func:`paired_ttest` and
    ``ci_low``/``ci_high`` from :func:`bootstrap_ci` of the differences.
    """
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("paired_comparison: pass two mappings (seed -> value) or two sequences")
    if isinstance(a, Mapping):
        common = [s for s in a if s in b]
        try:
            common = sorted(common)
        except TypeError:
            pass
        dropped = sorted({str(s) for s in set(a) ^ set(b)})
        seeds: List[object] = []
        av: List[float] = []
        bv: List[float] = []
        for s in common:
            x, y = a[s], b[s]
            if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
                dropped.append(str(s))
                continue
            seeds.append(s)
            av.append(float(x))
            bv.append(float(y))
    else:
        av = [float(v) for v in a]
        bv = [float(v) for v in b]
        if len(av) != len(bv):
            raise ValueError(f"paired_comparison needs equally long sequences, got {len(av)} and {len(bv)}")
        seeds = list(range(len(av)))
        dropped = []
    a_arr, b_arr = np.asarray(av, dtype=float), np.asarray(bv, dtype=float)
    d = a_arr - b_arr
    summ = summarize(d)
    tt = paired_ttest(a_arr, b_arr)
    lo, hi = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {
        "n": int(d.size),
        "seeds": seeds,
        "mean_diff": summ["mean"],
        "std_diff": summ["std"],
        "t": tt["t"],
        "df": tt["df"],
        "p_value": tt["p_value"],
        "p_value_reason": tt["reason"],
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n_resamples": n_resamples,
        "dropped_seeds": dropped,
    }


def method_pairs(methods: Sequence[str]) -> List[Tuple[str, str, str]]:
    """Pairs ``(a, b, relation)`` to report for the given methods.

    1. every curvature-aware method against its Euclidean twin when both are
       present (``camex``/``euclid``, ``camex-ties``/``ties``,
       ``camex-dare``/``dare``), relation ``"twin"``;
    2. every other method but ``dense`` against ``euclid`` when ``euclid`` is
       present, relation ``"vs-euclid"`` (``camex`` vs ``euclid`` is reported
       once, as a twin pair);
    3. every method against ``dense`` when ``dense`` is present, relation
       ``"vs-dense"``: the reference every MoE method must beat.

    Order follows ``methods``; duplicates are removed.
    """
    present = list(dict.fromkeys(methods))
    pairs: List[Tuple[str, str, str]] = []
    seen = set()
    for m in present:
        twin = EUCLIDEAN_TWIN.get(m)
        if twin is not None and twin in present:
            pairs.append((m, twin, "twin"))
            seen.add((m, twin))
    for base, relation in (("euclid", "vs-euclid"), ("dense", "vs-dense")):
        if base not in present:
            continue
        for m in present:
            if m in (base, "dense") or (m, base) in seen:
                continue
            pairs.append((m, base, relation))
            seen.add((m, base))
    return pairs
