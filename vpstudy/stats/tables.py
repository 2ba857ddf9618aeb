"""The paper's statistics on an opened run, as tidy tables (one row per layer, δ, ...).

Every interval resamples *samples* (whole traces), never single steps; see
:mod:`vpstudy.stats.estimators`. Every table says how many samples and steps it rests on.
Layers are the recorded text-layer indices (``run.manifest["layers"]``); δ labels are those
of the ``active@<δ>`` columns (``"0.001"``, ``"2/Nv"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import pandas as pd

from ..annotations import StepAnnotation
from ..rules import Threshold, active_column, active_labels, parse_column
from ..runs import Run
from .estimators import (
    bootstrap_mean_ci,
    auc,
    cluster_bootstrap_ci,
    jaccard_chance,
    layer_cosine,
    mean_ratio,
    never_activated_ratio,
    pearson,
    permutation_pvalue,
    spearman,
    step_dependence,
)
from ..errors import VpstudyError


class AnalysisError(VpstudyError):
    """A run (or a request on it) that the statistics cannot use; the message names it."""


@dataclass(frozen=True)
class AnalysisSettings:
    """Resampling settings shared by every table.

    Attributes:
        n_boot: bootstrap replicates (each draws as many samples as the run has, with replacement).
        n_perm: permutations of the correlation p-values.
        level: coverage of every interval.
        seed: seed of all resampling.
        top_k_fraction: size of the top-k visual sets of step dependence, as a share of N_v
            (k = max(1, round(fraction · N_v))).
    """

    n_boot: int = 1000
    n_perm: int = 1000
    level: float = 0.95
    seed: int = 0
    top_k_fraction: float = 0.1


# -- checks -------------------------------------------------------------------------------------


def check_run(run: Run) -> None:
    """Refuse an empty run or one whose recorded masses or counts are NaN (naming the sample)."""
    if len(run.samples) == 0 or len(run.steps) == 0:
        raise AnalysisError(f"{run.path}: the run holds no recorded samples")
    numeric = [c for c in run.steps.columns if c in ("mass", "max_head_mass") or parse_column(c) is not None]
    bad = run.steps[numeric].isna().any(axis=1)
    if bad.any():
        row = run.steps[bad].iloc[0]
        column = next(c for c in numeric if pd.isna(row[c]))
        raise AnalysisError(
            f"{run.path}: steps.parquet has NaN in '{column}' (sample {row['sample_id']!r}, step {row['step']}, "
            f"layer {row['layer']}) and {int(bad.sum()) - 1} more rows"
        )


def recorded_layers(run: Run) -> list[int]:
    """The text-layer indices the run recorded, in order."""
    return sorted(int(x) for x in run.steps["layer"].unique())


def check_layer(run: Run, layer: int) -> int:
    """``layer`` if the run recorded it, else an :class:`AnalysisError` naming the recorded ones."""
    layers = recorded_layers(run)
    if layer not in layers:
        raise AnalysisError(f"{run.path}: layer {layer} was not recorded (recorded layers: {layers})")
    return layer


def recorded_deltas(run: Run) -> list[str]:
    """The δ labels with an ``active@<δ>`` column, in column order."""
    return active_labels(run.steps.columns)


def check_delta(run: Run, delta: str | float) -> str:
    """The column label of ``delta`` (``0.001``, ``"0.001"`` or ``"2/Nv"``) if it was recorded."""
    try:
        label = Threshold.parse(delta).label
    except ValueError:
        raise AnalysisError(f"{run.path}: δ {delta!r} is neither a number nor 'k/Nv'") from None
    deltas = recorded_deltas(run)
    if label not in deltas:
        raise AnalysisError(f"{run.path}: δ {label} was not recorded (recorded: {', '.join(deltas)})")
    return label


def layer_position(run: Run, layer: int) -> int:
    """Index of recorded ``layer`` along the layer axis of the run's score arrays."""
    return list(run.manifest.get("layers", recorded_layers(run))).index(layer)


def _traces(run: Run, layer: int, columns: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Per column, one float64 array per sample (in run order) of the values at ``layer``."""
    table = run.steps[run.steps["layer"] == layer]
    groups = dict(list(table.groupby("sample_id", sort=False)))
    ids = [i for i in run.sample_ids if i in groups]
    return {c: [groups[i][c].to_numpy(dtype=np.float64) for i in ids] for c in columns}


_ARRAYS: WeakKeyDictionary[Run, dict[str, dict[str, np.ndarray]]] = WeakKeyDictionary()
_ARRAY_LABELS = {"scores": "score array", "max_scores": "max_scores"}


def _sample_arrays(run: Run, name: str) -> dict[str, np.ndarray]:
    """Every sample's array ``name`` (``scores`` [S, L, N] or ``max_scores`` [L, N]) as float32,
    refusing NaN; read once per opened run."""
    cached = _ARRAYS.setdefault(run, {})
    if name not in cached:
        out = {}
        for sample_id in run.sample_ids:
            stored = run.scores(sample_id) if name == "scores" else run.arrays(sample_id)[name]
            values = np.asarray(stored, dtype=np.float32)
            if np.isnan(values).any():
                raise AnalysisError(f"{run.path}: {_ARRAY_LABELS[name]} of sample {sample_id!r} holds NaN")
            out[sample_id] = values
        cached[name] = out
    return cached[name]


def _sample_scores(run: Run) -> dict[str, np.ndarray]:
    """Every sample's score array [S, L, N] as float32 (see :func:`_sample_arrays`)."""
    return _sample_arrays(run, "scores")


def check_arrays(run: Run) -> None:
    """Read every sample's score and max-score arrays once, refusing NaN (naming the sample)."""
    _sample_arrays(run, "scores")
    _sample_arrays(run, "max_scores")


def _mean_ci(values: np.ndarray, settings: AnalysisSettings) -> tuple[float, float, float]:
    """Mean of per-sample values with a percentile bootstrap interval over samples."""
    return bootstrap_mean_ci(values, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)


# -- tables -------------------------------------------------------------------------------------


def correlation_table(run: Run, settings: AnalysisSettings = AnalysisSettings(), *,
                      layers: Sequence[int] | None = None, deltas: Sequence[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Pearson and Spearman r between mass M(t,l) and active count N_act(t,l,δ), steps pooled.

    One row per (layer, δ): ``pearson``, ``spearman`` with ``*_low``/``*_high`` (bootstrap over
    samples) and ``*_p`` (permutation p-value that keeps trace dependence); NaN where the count
    is constant (e.g. every token active at a small δ).
    """
    check_run(run)
    layers = [check_layer(run, layer) for layer in (layers if layers is not None else recorded_layers(run))]
    deltas = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    rows = []
    for layer in layers:
        traces = _traces(run, layer, ["mass", *(active_column(d) for d in deltas)])
        for delta in deltas:
            xs, ys = traces["mass"], traces[active_column(delta)]
            row = {"layer": layer, "delta": delta, "n_samples": len(xs), "n_steps": int(sum(map(len, xs)))}
            for name, statistic in (("pearson", pearson), ("spearman", spearman)):
                estimate, low, high = cluster_bootstrap_ci(
                    xs, ys, statistic, n_boot=settings.n_boot, level=settings.level, seed=settings.seed
                )
                p = permutation_pvalue(xs, ys, statistic, n_perm=settings.n_perm, seed=settings.seed)
                row |= {name: estimate, f"{name}_low": low, f"{name}_high": high, f"{name}_p": p}
            rows.append(row)
    return pd.DataFrame(rows)


def never_activated_table(run: Run, settings: AnalysisSettings = AnalysisSettings(), *,
                          deltas: Sequence[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Never-activated ratio per dataset, layer and δ: mean over samples with a bootstrap CI.

    A sample's ratio is the share of its visual tokens with max_t p̄(t,l)_i ≤ δ (SPEC), read
    from its ``max_scores`` array; ``k/Nv`` thresholds resolve with the sample's own N_v.
    """
    check_run(run)
    deltas = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    layers = list(run.manifest.get("layers", recorded_layers(run)))
    n_visual = dict(zip(run.samples["sample_id"], run.samples["n_visual"], strict=True))
    ratios: dict[str, np.ndarray] = {}  # sample -> [len(deltas), L]
    for sample_id, max_scores in _sample_arrays(run, "max_scores").items():
        ratios[sample_id] = np.stack(
            [never_activated_ratio(max_scores, Threshold.parse(d).resolve(int(n_visual[sample_id]))) for d in deltas]
        )
    rows = []
    datasets = run.samples.groupby("dataset", sort=False)["sample_id"] if "dataset" in run.samples else [("", run.samples["sample_id"])]  # fmt: skip
    for dataset, ids in datasets:
        stacked = np.stack([ratios[i] for i in ids])  # [samples, deltas, L]
        for j, delta in enumerate(deltas):
            for position, layer in enumerate(layers):
                mean, low, high = _mean_ci(stacked[:, j, position], settings)
                rows.append({"dataset": dataset, "layer": layer, "delta": delta, "n_samples": len(ids),
                             "never_activated": mean, "never_activated_low": low, "never_activated_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def _top_k(n_visual: int, fraction: float) -> int:
    return max(1, min(n_visual, round(fraction * n_visual)))


def step_dependence_table(run: Run, settings: AnalysisSettings = AnalysisSettings()) -> pd.DataFrame:
    """Jaccard of top-k visual sets between consecutive steps and against step 0, per layer.

    Each sample contributes its mean over its steps; the table gives the mean over samples
    with a bootstrap CI, and ``jaccard_chance``: the overlap two random sets of the same size
    would have (:func:`~vpstudy.stats.estimators.jaccard_chance`, averaged over the samples).
    Samples with a single step have no pair and are left out.
    """
    check_run(run)
    layers = list(run.manifest.get("layers", recorded_layers(run)))
    per_layer: dict[int, tuple[list[float], list[float]]] = {layer: ([], []) for layer in layers}
    chance = []
    for scores in _sample_scores(run).values():
        if scores.shape[0] < 2:
            continue
        k = _top_k(scores.shape[-1], settings.top_k_fraction)
        chance.append(jaccard_chance(scores.shape[-1], k))
        for position, layer in enumerate(layers):
            consecutive, against_first = step_dependence(scores[:, position], k)
            per_layer[layer][0].append(consecutive.mean())
            per_layer[layer][1].append(against_first.mean())
    rows = []
    for layer, (consecutive, against_first) in per_layer.items():
        c, c_low, c_high = _mean_ci(np.array(consecutive), settings)
        f, f_low, f_high = _mean_ci(np.array(against_first), settings)
        rows.append({"layer": layer, "top_k_fraction": settings.top_k_fraction, "n_samples": len(consecutive),
                     "jaccard_consecutive": c, "jaccard_consecutive_low": c_low, "jaccard_consecutive_high": c_high,
                     "jaccard_vs_step0": f, "jaccard_vs_step0_low": f_low, "jaccard_vs_step0_high": f_high,
                     "jaccard_chance": float(np.mean(chance)) if chance else float("nan")})  # fmt: skip
    return pd.DataFrame(rows)


def step_dependence_curve(run: Run, layer: int, top_k_fraction: float = 0.1, max_step: int | None = None) -> pd.DataFrame:
    """Mean Jaccard against step 0 and against the previous step, per step t ≥ 1, at one layer
    (for plotting): columns ``step, jaccard_vs_step0, jaccard_consecutive, n_samples``."""
    check_run(run)
    position = layer_position(run, check_layer(run, layer))
    records = []
    for sample_id, scores in _sample_scores(run).items():
        if scores.shape[0] < 2:
            continue
        consecutive, against_first = step_dependence(scores[:, position], _top_k(scores.shape[-1], top_k_fraction))
        for t in range(1, scores.shape[0]):
            records.append((sample_id, t, against_first[t - 1], consecutive[t - 1]))
    table = pd.DataFrame(records, columns=["sample_id", "step", "jaccard_vs_step0", "jaccard_consecutive"])
    if max_step is not None:
        table = table[table["step"] <= max_step]
    return (
        table.groupby("step")
        .agg(jaccard_vs_step0=("jaccard_vs_step0", "mean"), jaccard_consecutive=("jaccard_consecutive", "mean"),
             n_samples=("sample_id", "nunique"))  # fmt: skip
        .reset_index()
    )


def layer_similarity(run: Run) -> tuple[list[int], np.ndarray]:
    """Layer-to-layer cosine similarity of p̄ (the paper's procedure): per sample the mean over
    its steps, then the mean over samples with equal weight. Returns (layers, [L, L])."""
    check_run(run)
    layers = list(run.manifest.get("layers", recorded_layers(run)))
    matrices = [layer_cosine(scores) for scores in _sample_scores(run).values()]
    return layers, np.mean(matrices, axis=0)


def _annotated(run: Run, annotations: Sequence[StepAnnotation], layer: int) -> pd.DataFrame:
    """The steps rows of ``layer`` for the annotated steps, joined with their annotation."""
    if not annotations:
        raise AnalysisError(f"{run.path}: no annotated steps (no sample is on its reference path)")
    keys = pd.DataFrame({"sample_id": [a.sample_id for a in annotations], "step": [a.step for a in annotations],
                         "reads_image": [a.reads_image for a in annotations], "region": [a.region for a in annotations]})  # fmt: skip
    table = run.steps[run.steps["layer"] == layer][["sample_id", "step", "mass"]]
    return keys.merge(table, on=["sample_id", "step"], how="inner", validate="one_to_one")


def _per_trace(frame: pd.DataFrame, x: str, y: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    groups = [g for _, g in frame.groupby("sample_id", sort=False)]
    return [g[x].to_numpy(dtype=np.float64) for g in groups], [g[y].to_numpy() for g in groups]


def mass_contrast_table(run: Run, annotations: Sequence[StepAnnotation],
                        settings: AnalysisSettings = AnalysisSettings()) -> pd.DataFrame:  # fmt: skip
    """Visual mass on image-reading vs. text-only annotated steps, per layer.

    Effect sizes, each with a bootstrap CI over samples: ``auc`` (probability that an
    image-reading step carries more mass than a text-only one; 0.5 = no difference) and
    ``ratio`` (mean mass reading / mean mass text-only), plus the two means.
    """
    check_run(run)
    rows = []
    for layer in recorded_layers(run):
        frame = _annotated(run, annotations, layer)
        xs, ys = _per_trace(frame, "mass", "reads_image")
        reads = frame["reads_image"].to_numpy(dtype=bool)
        mass = frame["mass"].to_numpy(dtype=np.float64)
        row = {"layer": layer, "n_samples": len(xs), "reading_steps": int(reads.sum()), "text_steps": int((~reads).sum()),
               "mass_reading": float(mass[reads].mean()) if reads.any() else float("nan"),
               "mass_text": float(mass[~reads].mean()) if (~reads).any() else float("nan")}  # fmt: skip
        for name, statistic in (("auc", auc), ("ratio", mean_ratio)):
            estimate, low, high = cluster_bootstrap_ci(
                xs, ys, statistic, n_boot=settings.n_boot, level=settings.level, seed=settings.seed
            )
            row |= {name: estimate, f"{name}_low": low, f"{name}_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def localization_table(run: Run, annotations: Sequence[StepAnnotation],
                       settings: AnalysisSettings = AnalysisSettings()) -> pd.DataFrame:  # fmt: skip
    """Share of annotated steps with a region whose top-attended visual token (argmax of p̄)
    lies in that region, per layer, with a bootstrap CI over samples, against the chance rate
    (region size / N_v, averaged over the same steps)."""
    check_run(run)
    layers = list(run.manifest.get("layers", recorded_layers(run)))
    with_region = [a for a in annotations if a.region]
    if not with_region:
        raise AnalysisError(f"{run.path}: no annotated step refers to an image region")
    scores = _sample_scores(run)
    top = {sid: s.argmax(axis=-1) for sid, s in scores.items()}  # [S, L]
    rows = []
    for position, layer in enumerate(layers):
        hits: dict[str, list[float]] = {}
        chance = []
        for a in with_region:
            hits.setdefault(a.sample_id, []).append(float(top[a.sample_id][a.step, position] in a.region))
            chance.append(len(a.region) / scores[a.sample_id].shape[-1])
        xs = [np.array(v) for v in hits.values()]
        estimate, low, high = cluster_bootstrap_ci(
            xs, xs, lambda x, _y: float(np.mean(x)), n_boot=settings.n_boot, level=settings.level, seed=settings.seed
        )
        rows.append({"layer": layer, "n_samples": len(xs), "steps": len(chance), "localization": estimate,
                     "localization_low": low, "localization_high": high, "chance": float(np.mean(chance))})  # fmt: skip
    return pd.DataFrame(rows)
