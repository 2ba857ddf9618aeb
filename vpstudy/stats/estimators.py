"""Statistics of recorded runs, as plain functions on arrays (definitions: docs/design.md).

This module holds the estimators; turning a run into tables, the CLI (``vpstudy analyze``) and
the figures build on it. Every function states the shapes it takes. Conventions:

- a *trace* is one sample's recorded steps; steps within a trace are dependent, so uncertainty
  over traces resamples whole traces (:func:`cluster_bootstrap_ci`), never single steps;
- correlations of constant inputs are undefined and returned as NaN (as the paper's code
  returns None), never as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as sps


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two equal-length 1-D arrays; NaN if either is constant or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.clip((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ: Pearson r of the average ranks (ties share their mean rank)."""
    return pearson(sps.rankdata(x), sps.rankdata(y))


def auc(values: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive step's value exceeds a negative one's (ties count half):
    the Mann–Whitney U of the positives divided by n₊·n₋. NaN when a class is empty.

    Args:
        values: [S] e.g. visual mass per step.
        labels: [S] bool, e.g. whether the step reads the image.
    """
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = sps.rankdata(values)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mean_ratio(values: np.ndarray, labels: np.ndarray) -> float:
    """Mean of ``values`` where ``labels`` is True over the mean where it is False (NaN if
    either class is empty or the denominator is 0)."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any() or values[~labels].mean() == 0:
        return float("nan")
    return float(values[labels].mean() / values[~labels].mean())


class _Pooled:
    """Traces pooled into one array, with the index arithmetic the resampling needs."""

    def __init__(self, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"need the same number (> 0) of x and y traces, got {len(xs)} and {len(ys)}")
        self.lengths = np.array([len(x) for x in xs], dtype=np.int64)
        if any(len(y) != n for y, n in zip(ys, self.lengths, strict=True)):
            raise ValueError("each trace needs as many y values as x values")
        self.x = np.concatenate([np.asarray(x, dtype=np.float64) for x in xs])
        self.y = np.concatenate([np.asarray(y, dtype=np.float64) for y in ys])
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.trace = np.repeat(np.arange(len(xs)), self.lengths)  # trace of each pooled step
        self.position = np.arange(len(self.x)) - self.starts[self.trace]  # step within its trace

    def gather(self, picks: np.ndarray) -> np.ndarray:
        """Pooled-step indices of the traces ``picks`` (in that order, repeats allowed)."""
        lengths = self.lengths[picks]
        offsets = np.repeat(self.starts[picks] - (np.cumsum(lengths) - lengths), lengths)
        return offsets + np.arange(int(lengths.sum()))


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The equal-tailed percentile interval of bootstrap ``replicates`` at coverage ``level``."""
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of independent per-unit values (e.g. one per sample) with a percentile bootstrap
    interval: ``n_boot`` resamples of the units with replacement. NaN values are dropped first;
    all NaN gives NaN for all three.

    Returns:
        ``(mean, low, high)``.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return (float(values.mean()), *percentile_interval(means, level))


def cluster_bootstrap_ci(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray, np.ndarray], float] = pearson,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A statistic of the pooled steps, with a percentile bootstrap interval over traces.

    Args:
        xs: one 1-D array per trace (e.g. the mass per step).
        ys: one 1-D array per trace, as long as its ``xs`` array (e.g. the active count per step).
        statistic: computed on the concatenation of the chosen traces.
        n_boot: bootstrap replicates; each draws ``len(xs)`` traces with replacement.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``(estimate, low, high)``; replicates where the statistic is NaN are dropped, and the
        interval is NaN if fewer than half of them remain.
    """
    pooled = _Pooled(xs, ys)
    estimate = statistic(pooled.x, pooled.y)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        index = pooled.gather(rng.integers(0, len(xs), size=len(xs)))
        values[b] = statistic(pooled.x[index], pooled.y[index])
    values = values[~np.isnan(values)]
    if len(values) < n_boot / 2:
        return estimate, float("nan"), float("nan")
    return (estimate, *percentile_interval(values, level))


def permutation_pvalue(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray, np.ndarray], float] = pearson,
    *,
    n_perm: int = 2000,
    seed: int = 0,
) -> float:
    """Two-sided permutation p-value of a pooled statistic, respecting the dependence in traces.

    Each permutation rebuilds every trace's y from a *random other trace's mean* plus its own
    deviations from its mean, *circularly shifted* by a random offset. This breaks the coupling
    of x and y both between traces (the trace means are permuted) and within traces (the
    deviations are shifted), while keeping each y-trace's autocorrelation, so steps that depend
    on each other do not pass for independent evidence. Shuffling single steps instead would
    make the null far too narrow (see tests/stats).

    Args:
        xs: one 1-D array per trace.
        ys: one 1-D array per trace, as long as its ``xs`` array.
        statistic: computed on the pooled steps; the p-value compares its absolute value.
        n_perm: permutations.
        seed: seed of the permutations.

    Returns:
        ``(1 + #{|T_perm| >= |T_obs|}) / (1 + n_perm)``; NaN if the observed statistic is NaN.
    """
    pooled = _Pooled(xs, ys)
    observed = statistic(pooled.x, pooled.y)
    if np.isnan(observed):
        return float("nan")
    rng = np.random.default_rng(seed)
    sums = np.bincount(pooled.trace, weights=pooled.y, minlength=len(xs))
    means = sums / pooled.lengths
    deviations = pooled.y - means[pooled.trace]
    n_trace = pooled.lengths[pooled.trace]
    exceed = 0
    for _ in range(n_perm):
        order = rng.permutation(len(xs))
        shifts = rng.integers(0, pooled.lengths)
        # np.roll(d, s)[p] == d[(p - s) mod n], for every trace at once
        source = pooled.starts[pooled.trace] + (pooled.position - shifts[pooled.trace]) % n_trace
        value = statistic(pooled.x, means[order][pooled.trace] + deviations[source])
        exceed += bool(np.isnan(value) or abs(value) >= abs(observed) - 1e-12)
    return (1 + exceed) / (1 + n_perm)


def never_activated_ratio(max_scores: np.ndarray, delta: float) -> np.ndarray:
    """Share of visual tokens whose p̄ never exceeded ``delta`` over a trace.

    Args:
        max_scores: [L, N] running maximum over steps of p̄ per layer (a run's ``max_scores``).
        delta: the activity threshold δ (a token is active at a step when p̄ > δ, strictly).

    Returns:
        [L] float64 ratios in [0, 1].
    """
    return (np.asarray(max_scores) <= delta).mean(axis=-1)


def top_k_sets(scores: np.ndarray, k: int) -> list[frozenset[int]]:
    """Indices of the ``k`` largest entries of each row of ``scores`` [S, N] (ties: lower index)."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in 1..{scores.shape[-1]}, got {k}")
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :k]
    return [frozenset(row.tolist()) for row in order]


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def jaccard_chance(n: int, k: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random ``k``-subsets of ``n`` items:
    E[I / (2k − I)] with I ~ Hypergeometric(n, k, k). The reference level for top-k sets that
    share nothing but chance."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    overlap = np.arange(max(0, 2 * k - n), k + 1)
    return float((sps.hypergeom(n, k, k).pmf(overlap) * overlap / (2 * k - overlap)).sum())


def step_dependence(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard overlap of the top-k visual sets of one trace at one layer.

    Args:
        scores: [S, N] p̄ per step.
        k: size of the top set.

    Returns:
        ``(consecutive, against_first)``, each [S - 1]: J(t-1, t) and J(0, t) for t = 1..S-1.
    """
    sets = top_k_sets(scores, k)
    consecutive = np.array([jaccard(sets[t - 1], sets[t]) for t in range(1, len(sets))])
    against_first = np.array([jaccard(sets[0], sets[t]) for t in range(1, len(sets))])
    return consecutive, against_first


def layer_cosine(scores: np.ndarray) -> np.ndarray:
    """Layer-to-layer cosine similarity of p̄, averaged over the steps of one trace.

    As the paper's code: each layer's vector is divided by its L2 norm (+1e-8), the Gram matrix
    is clipped to [-1, 1], and the per-step matrices are averaged.

    Args:
        scores: [S, L, N] p̄ per step and layer.

    Returns:
        [L, L] float64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    unit = scores / (np.linalg.norm(scores, axis=-1, keepdims=True) + 1e-8)
    gram = np.einsum("sln,smn->slm", unit, unit)
    return np.clip(gram, -1.0, 1.0).mean(axis=0)
