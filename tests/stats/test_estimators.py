"""The estimators of vpstudy.stats: against scipy on the same numbers, exact on hand-built cases,
and calibrated on synthetic traces with a planted correlation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import cosine

from vpstudy import stats


def test_pearson_and_spearman_match_scipy_including_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=50)
        y = 0.3 * x + rng.normal(size=50)
        y_ties = np.round(y)  # active counts are integers: many ties
        assert stats.pearson(x, y) == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-12)
        assert stats.spearman(x, y_ties) == pytest.approx(sps.spearmanr(x, y_ties).statistic, abs=1e-12)


def test_auc_and_mean_ratio_match_scipy_and_numpy():
    rng = np.random.default_rng(4)
    values = np.round(rng.normal(size=300), 1)  # rounded: ties
    labels = rng.random(300) < 0.3
    u = sps.mannwhitneyu(values[labels], values[~labels], alternative="two-sided").statistic
    assert stats.auc(values, labels) == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)
    assert stats.auc(np.array([3.0, 1.0, 2.0]), np.array([True, False, False])) == 1.0
    assert stats.mean_ratio(values + 5, labels) == pytest.approx((values[labels] + 5).mean() / (values[~labels] + 5).mean())
    assert np.isnan(stats.auc(values, np.ones(300, dtype=bool)))


def test_correlation_of_a_constant_is_nan_not_zero():
    assert np.isnan(stats.pearson(np.ones(5), np.arange(5.0)))
    assert np.isnan(stats.spearman(np.arange(5.0), np.full(5, 3.0)))
    with pytest.raises(ValueError, match="one length"):
        stats.pearson(np.ones(3), np.ones(4))


def test_never_activated_ratio_on_a_hand_built_trace():
    max_scores = np.array([[0.0, 0.001, 0.0011, 0.5], [0.002, 0.002, 0.002, 0.002]])
    np.testing.assert_array_equal(stats.never_activated_ratio(max_scores, 0.001), [0.5, 0.0])
    np.testing.assert_array_equal(stats.never_activated_ratio(max_scores, 0.002), [0.75, 1.0])  # strict: p̄ > δ


def test_top_k_jaccard_on_hand_built_steps():
    scores = np.array([
        [0.9, 0.8, 0.1, 0.0],  # top-2 {0, 1}
        [0.9, 0.0, 0.8, 0.1],  # {0, 2}: J with previous = 1/3
        [0.0, 0.1, 0.8, 0.9],  # {2, 3}: J with previous = 1/3, with step 0 = 0
        [0.5, 0.5, 0.5, 0.5],  # ties go to the lower index: {0, 1}
    ])  # fmt: skip
    consecutive, first = stats.step_dependence(scores, k=2)
    np.testing.assert_allclose(consecutive, [1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(first, [1 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match="k must be"):
        stats.top_k_sets(scores, 5)


def test_jaccard_chance_is_exact_on_small_cases_and_matches_simulation():
    # n = 4, k = 2: the second pair equals the first with prob. 1/6 (J = 1), shares one item
    # with prob. 4/6 (J = 1/3), none with prob. 1/6 (J = 0)
    assert stats.jaccard_chance(4, 2) == pytest.approx(1 / 6 + 4 / 6 / 3)
    assert stats.jaccard_chance(5, 5) == 1.0
    rng = np.random.default_rng(0)
    draws = [stats.jaccard(frozenset(rng.choice(64, 6, replace=False).tolist()),
                           frozenset(rng.choice(64, 6, replace=False).tolist())) for _ in range(20000)]  # fmt: skip
    assert stats.jaccard_chance(64, 6) == pytest.approx(np.mean(draws), abs=0.002)


def test_layer_cosine_matches_scipy_cosine_per_step():
    rng = np.random.default_rng(1)
    scores = rng.random((6, 3, 20))
    expected = np.mean([[[1 - cosine(s[a], s[b]) for b in range(3)] for a in range(3)] for s in scores], axis=0)
    np.testing.assert_allclose(stats.layer_cosine(scores), expected, atol=1e-6)


def _traces(rho: float, n_traces: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Traces whose pooled steps have correlation ``rho`` in the population, with dependence
    inside a trace: a shared trace-level effect (half the variance) and AR(1) noise (φ = 0.8)."""
    cov = [[1.0, rho], [rho, 1.0]]
    xs, ys = [], []
    for _ in range(n_traces):
        length = int(rng.integers(10, 40))
        level = rng.multivariate_normal([0, 0], cov) * np.sqrt(0.5)
        noise = rng.multivariate_normal([0, 0], cov, size=length)
        ar = np.empty_like(noise)
        ar[0] = noise[0]
        for t in range(1, length):
            ar[t] = 0.8 * ar[t - 1] + np.sqrt(1 - 0.8**2) * noise[t]
        steps = level + ar * np.sqrt(0.5)
        xs.append(steps[:, 0])
        ys.append(steps[:, 1])
    return xs, ys


def coverage(runs: int = 200) -> tuple[float, float]:
    """Share of synthetic runs (planted r = 0.5, seed 2026) whose 90% interval covers r, when the
    bootstrap resamples traces and when it resamples single steps."""
    rng = np.random.default_rng(2026)
    rho, covered, covered_by_steps = 0.5, 0, 0
    for run in range(runs):
        xs, ys = _traces(rho, 30, rng)
        _, low, high = stats.cluster_bootstrap_ci(xs, ys, n_boot=200, level=0.9, seed=run)
        covered += low <= rho <= high
        steps_x, steps_y = np.concatenate(xs), np.concatenate(ys)
        _, low, high = stats.cluster_bootstrap_ci(list(steps_x[:, None]), list(steps_y[:, None]), n_boot=200,
                                                  level=0.9, seed=run)  # fmt: skip
        covered_by_steps += low <= rho <= high
    return covered / runs, covered_by_steps / runs


def null_pvalues(runs: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """p-values of synthetic runs under a planted null (seed 7): trace-respecting permutation,
    and shuffling single steps."""
    rng = np.random.default_rng(7)
    pvalues, naive = [], []
    for run in range(runs):
        xs, ys = _traces(0.0, 20, rng)  # rho = 0: x and y independent at both levels
        pvalues.append(stats.permutation_pvalue(xs, ys, n_perm=200, seed=run))
        naive.append(_step_shuffle_pvalue(xs, ys, rng))
    return np.array(pvalues), np.array(naive)


def test_trace_bootstrap_covers_a_planted_correlation_at_close_to_its_nominal_rate():
    """Over many synthetic runs, the 90% interval that resamples traces covers the planted r on
    close to 90% of runs; resampling single steps (ignoring the dependence) covers far less."""
    by_traces, by_steps = coverage()
    assert 0.82 <= by_traces <= 0.97, by_traces
    assert by_steps < 0.75, by_steps


def test_permutation_pvalues_are_uniform_under_a_planted_null():
    """x and y independent, but each with trace-level effects and AR(1) steps: the p-values of
    200 such runs are uniform (KS test at a fixed seed); shuffling single steps is not."""
    pvalues, naive = null_pvalues()
    assert sps.kstest(pvalues, "uniform").pvalue > 0.01
    assert np.mean(pvalues < 0.05) < 0.10
    assert np.mean(naive < 0.05) > 0.25  # the naive test calls noise significant


def _step_shuffle_pvalue(xs, ys, rng, n_perm=200):
    x, y = np.concatenate(xs), np.concatenate(ys)
    observed = abs(stats.pearson(x, y))
    exceed = sum(abs(stats.pearson(x, rng.permutation(y))) >= observed for _ in range(n_perm))
    return (1 + exceed) / (1 + n_perm)


def test_a_planted_correlation_is_detected_and_a_planted_null_is_not():
    rng = np.random.default_rng(3)
    xs, ys = _traces(0.6, 40, rng)
    assert stats.permutation_pvalue(xs, ys, n_perm=500) < 0.01
    null_x, null_y = _traces(0.0, 40, rng)
    assert stats.permutation_pvalue(null_x, null_y, n_perm=500) > 0.05


if __name__ == "__main__":  # python tests/stats/test_estimators.py: the rates the tests bound
    by_traces, by_steps = coverage()
    print(f"90% interval covers the planted r: resampling traces {by_traces:.3f}, resampling steps {by_steps:.3f}")
    pvalues, naive = null_pvalues()
    print(f"planted null: KS p = {sps.kstest(pvalues, 'uniform').pvalue:.2f}, share below 0.05 = "
          f"{np.mean(pvalues < 0.05):.3f}; shuffling steps: share below 0.05 = {np.mean(naive < 0.05):.3f}")
