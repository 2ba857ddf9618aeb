"""Two statistics of step-dependent visual evidence that read more than one array per step.

- :func:`attribution_agreement_table`: does a step's attention point where its gradient-based
  attribution does? Per layer, the Spearman ρ between the step's head-mean attention scores
  p̄(t, l) and the captum attribution of the token it generated (``vpstudy attribute``), and the
  Jaccard overlap of their top-k sets against the overlap of two random sets of that size.
- :func:`relevant_shift_table` / :func:`relevant_shift_curve`: the shift of the relevant visual
  set along a trace (DSTP's "relevant visual information shift"): at each decode step, how much
  of the step's attention a set chosen once at the prefill still covers, relative to the step's
  own best set of the same size, and their Jaccard overlap, by position in the trace.

Every interval resamples samples (:func:`~vpstudy.stats.estimators.bootstrap_mean_ci` of the
per-sample means), never single steps, since steps of one trace are dependent. Both read p̄ per
step, so they are computed at the run's score layers (:mod:`vpstudy.storage`); a layer without p̄
is refused in one line saying what to record instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..runs import Run
from .estimators import bootstrap_mean_ci, jaccard, jaccard_chance, spearman, top_k_sets
from .tables import AnalysisError, AnalysisSettings, check_run, layer_position, require_scores


def _k(n_visual: int, fraction: float) -> int:
    return max(1, min(n_visual, round(fraction * n_visual)))


def attribution_agreement_table(
    run: Run, settings: AnalysisSettings = AnalysisSettings(), *, layers: Sequence[int] | None = None
) -> pd.DataFrame:
    """Agreement of attention with attribution, per layer (default: every layer whose p̄ the run keeps).

    Columns: ``layer``; ``spearman`` (mean over samples of each sample's mean per-step ρ) with
    ``spearman_low``/``spearman_high``; ``top_k_jaccard`` with its interval; ``jaccard_chance``
    (two random k-sets); ``samples``; ``steps``.

    Raises:
        AnalysisError: no sample of the run has an attribution (run ``vpstudy attribute`` first).
    """
    from ..attribution import load_attribution

    check_run(run)
    require_scores(run, "attribution agreement", at_least=1)
    layers = list(layers) if layers is not None else run.score_layers
    position = {layer: layer_position(run, layer, "attribution agreement") for layer in layers}
    per_layer: dict[int, tuple[list[float], list[float]]] = {layer: ([], []) for layer in layers}
    chance, steps = [], 0
    for sample_id in run.sample_ids:
        attribution = load_attribution(run, sample_id)
        if attribution is None:
            continue
        scores = run.scores(sample_id)  # [S, score layers, N], memory-mapped: read a layer at a time
        n = min(len(attribution), len(scores))
        k = _k(scores.shape[-1], settings.top_k_fraction)
        chance.append(jaccard_chance(scores.shape[-1], k))
        steps += n
        attr_sets = top_k_sets(attribution[:n], k)
        for layer in layers:
            p = np.asarray(scores[:n, position[layer]], dtype=np.float64)
            rhos = [spearman(attribution[t], p[t]) for t in range(n)]
            sets = top_k_sets(p, k)
            per_layer[layer][0].append(float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan"))
            per_layer[layer][1].append(float(np.mean([jaccard(a, b) for a, b in zip(attr_sets, sets, strict=True)])))
    if not chance:
        raise AnalysisError(
            f"{run.path}: no sample has an attribution; run `vpstudy attribute {run.path} --model DIR` first"
        )
    rows = []
    for layer in layers:
        rho, jac = (np.asarray(v) for v in per_layer[layer])
        r = bootstrap_mean_ci(rho, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)
        j = bootstrap_mean_ci(jac, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)
        rows.append(
            {
                "layer": layer,
                "spearman": r[0],
                "spearman_low": r[1],
                "spearman_high": r[2],
                "top_k_jaccard": j[0],
                "top_k_jaccard_low": j[1],
                "top_k_jaccard_high": j[2],
                "jaccard_chance": float(np.mean(chance)),
                "samples": len(chance),
                "steps": steps,
            }
        )
    return pd.DataFrame(rows)


def _shift_of_sample(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For one trace's scores [S, N]: per decode step (t ≥ 1), the prefill set's coverage (the
    step's attention on the top-k set of step 0, over the step's attention on its own top-k set)
    and the Jaccard overlap of the two sets."""
    sets = top_k_sets(scores, k)
    prefill = np.array(sorted(sets[0]))
    coverage, overlap = [], []
    for t in range(1, len(scores)):
        own = np.sort(scores[t])[::-1][:k].sum()
        coverage.append(scores[t, prefill].sum() / own if own > 0 else np.nan)
        overlap.append(jaccard(sets[0], sets[t]))
    return np.asarray(coverage), np.asarray(overlap)


def relevant_shift_curve(
    run: Run, layer: int, settings: AnalysisSettings = AnalysisSettings(), *, bins: int = 5
) -> pd.DataFrame:
    """The shift by relative position in the trace: decode steps t = 1..S−1 of each sample are
    put in ``bins`` equal bins of (t − 1) / (S − 1); per bin, the mean over samples (of each
    sample's mean in the bin) of ``coverage`` (the prefill set's share of the step's attention
    relative to the step's own best set of the same size; 1 = no shift) and ``jaccard`` (prefill
    set vs. step set), with intervals over samples."""
    check_run(run)
    position = layer_position(run, layer, "the relevant-set shift")
    per_bin: dict[int, tuple[list[float], list[float]]] = {b: ([], []) for b in range(bins)}
    for sample_id in run.sample_ids:
        scores = run.scores(sample_id)[:, position].astype(np.float64)
        if len(scores) < 2:
            continue
        coverage, overlap = _shift_of_sample(scores, _k(scores.shape[-1], settings.top_k_fraction))
        where = np.minimum((np.arange(len(coverage)) / max(1, len(coverage)) * bins).astype(int), bins - 1)
        for b in range(bins):
            if (where == b).any():
                per_bin[b][0].append(float(np.nanmean(coverage[where == b])))
                per_bin[b][1].append(float(np.mean(overlap[where == b])))
    rows = []
    for b in range(bins):
        cov, jac = (np.asarray(v) for v in per_bin[b])
        c = bootstrap_mean_ci(cov, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)
        j = bootstrap_mean_ci(jac, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)
        rows.append(
            {
                "layer": layer,
                "bin": b,
                "position_from": b / bins,
                "position_to": (b + 1) / bins,
                "coverage": c[0],
                "coverage_low": c[1],
                "coverage_high": c[2],
                "jaccard": j[0],
                "jaccard_low": j[1],
                "jaccard_high": j[2],
                "samples": len(cov),
            }
        )
    return pd.DataFrame(rows)


def relevant_shift_table(
    run: Run,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    layers: Sequence[int] | None = None,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """The shift of the relevant visual set per layer, whole traces pooled per sample.

    Columns: ``layer``; ``coverage`` (mean over samples of the per-sample mean coverage of the
    decode steps, see :func:`relevant_shift_curve`) with interval; ``shifted_share``: the share of
    a sample's decode steps whose coverage is below ``threshold`` (the prefill set misses most of
    what the step attends to), mean over samples with interval; ``jaccard`` to the prefill set
    with interval; ``samples``.
    """
    check_run(run)
    require_scores(run, "the relevant-set shift", at_least=1)
    layers = list(layers) if layers is not None else run.score_layers
    positions = {layer: layer_position(run, layer, "the relevant-set shift") for layer in layers}
    values: dict[int, tuple[list[float], list[float], list[float]]] = {layer: ([], [], []) for layer in layers}
    for sample_id in run.sample_ids:
        stored = run.scores(sample_id)  # memory-mapped: each layer is read when it is used
        if len(stored) < 2:
            continue
        k = _k(stored.shape[-1], settings.top_k_fraction)
        for layer in layers:
            coverage, overlap = _shift_of_sample(np.asarray(stored[:, positions[layer]], dtype=np.float64), k)
            values[layer][0].append(float(np.nanmean(coverage)))
            values[layer][1].append(float(np.nanmean(coverage < threshold)))
            values[layer][2].append(float(np.mean(overlap)))
    rows = []
    for layer in layers:
        cov, shifted, jac = (np.asarray(v) for v in values[layer])
        ci = [
            bootstrap_mean_ci(v, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)
            for v in (cov, shifted, jac)
        ]
        rows.append(
            {
                "layer": layer,
                "coverage": ci[0][0],
                "coverage_low": ci[0][1],
                "coverage_high": ci[0][2],
                "shifted_share": ci[1][0],
                "shifted_share_low": ci[1][1],
                "shifted_share_high": ci[1][2],
                "jaccard": ci[2][0],
                "jaccard_low": ci[2][1],
                "jaccard_high": ci[2][2],
                "threshold": threshold,
                "samples": len(cov),
            }
        )
    return pd.DataFrame(rows)
