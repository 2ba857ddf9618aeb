"""The paper's statistics on an opened run, as tidy tables (one row per layer, δ, ...).

Every interval resamples *samples* (whole traces), never single steps; see
:mod:`vpstudy.stats.estimators`. Every table says how many samples and steps it rests on.
Layers are the recorded text-layer indices (``run.manifest["layers"]``); δ labels are those
of the ``active@<δ>`` columns (``"0.001"``, ``"2/Nv"``).

Tables of the steps table and of ``max_scores`` (correlations, never-activated shares, mass
contrast) exist under every store policy (:mod:`vpstudy.storage`). Tables of p̄ per step (step
dependence, layer similarity, localization) are computed at the run's *score layers*
(:attr:`vpstudy.runs.Run.score_layers`: every recorded layer under ``--store full``, the analysis
layer and ``--score-layers`` under ``analysis``, none under ``scalars``); asked for a layer
without p̄ they say in one line what to record instead (:func:`require_scores`). They read one
sample at a time, only the layers they need, so memory does not grow with the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..annotations import StepAnnotation
from ..errors import VpstudyError
from ..rules import Threshold, active_column, active_labels, parse_column
from ..runs import Run
from ..storage import missing_scores
from .estimators import (
    auc,
    bootstrap_mean_ci,
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


class AnalysisError(VpstudyError):
    """A run (or a request on it) that the statistics cannot use; the message names it."""


class MissingScoresError(AnalysisError):
    """p̄ asked for at a layer the run's store policy did not keep (:func:`require_scores`); the
    message says what to record instead. Reports and figures turn it into a skip line."""


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


def scores_note(run: Run, what: str, layers: Sequence[int] = (), *, at_least: int = 0) -> str | None:
    """One line saying that ``what`` needs p̄ at ``layers`` (or at ``at_least`` layers) which the
    run does not keep, and what to record instead; None when the run keeps it
    (:func:`vpstudy.storage.missing_scores`)."""
    note = missing_scores(what, layers, {**run.store, "score_layers": run.score_layers}, at_least=at_least)
    return None if note is None else f"{run.path}: {note}"


def require_scores(run: Run, what: str, layers: Sequence[int] = (), *, at_least: int = 0) -> None:
    """Raise :class:`MissingScoresError` with :func:`scores_note`'s line unless the run keeps p̄ where
    ``what`` needs it."""
    note = scores_note(run, what, layers, at_least=at_least)
    if note is not None:
        raise MissingScoresError(note)


def layer_position(run: Run, layer: int, what: str = "reading p̄") -> int:
    """Index of ``layer`` along the layer axis of the run's score arrays (its score layers).

    Raises:
        AnalysisError: ``layer`` was not recorded, or its p̄ was not kept (one line saying what
            ``what`` needs and what to record instead).
    """
    check_layer(run, layer)
    require_scores(run, what, [layer])
    return run.score_layers.index(layer)


def _traces(run: Run, layer: int, columns: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Per column, one float64 array per sample (in run order) of the values at ``layer``."""
    table = run.steps[run.steps["layer"] == layer]
    groups = dict(list(table.groupby("sample_id", sort=False)))
    ids = [i for i in run.sample_ids if i in groups]
    return {c: [groups[i][c].to_numpy(dtype=np.float64) for i in ids] for c in columns}


_ARRAY_LABELS = {"scores": "score array", "max_scores": "max_scores"}


def _checked(run: Run, sample_id: str, name: str, stored: np.ndarray) -> np.ndarray:
    values = np.asarray(stored, dtype=np.float32)
    if np.isnan(values).any():
        raise AnalysisError(f"{run.path}: {_ARRAY_LABELS[name]} of sample {sample_id!r} holds NaN")
    return values


def _sample_max_scores(run: Run) -> Iterator[tuple[str, np.ndarray]]:
    """Each sample's ``max_scores`` [L, N] as float32, refusing NaN; one sample at a time."""
    for sample_id in run.sample_ids:
        yield sample_id, _checked(run, sample_id, "max_scores", run.arrays(sample_id)["max_scores"])


def _sample_scores(run: Run, layers: Sequence[int] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Each sample's p̄ [S, len(layers), N] at ``layers`` (default: every score layer) as float32,
    refusing NaN; one sample at a time, reading only those layers."""
    positions = [layer_position(run, layer) for layer in (run.score_layers if layers is None else layers)]
    everything = positions == list(range(len(run.score_layers)))
    for sample_id in run.sample_ids:
        stored = run.scores(sample_id)
        yield sample_id, _checked(run, sample_id, "scores", stored if everything else stored[:, positions])


def check_arrays(run: Run) -> None:
    """Read every sample's max-score array (and p̄, where the run keeps it) once, refusing NaN
    (naming the sample)."""
    for _ in _sample_max_scores(run):
        pass
    if run.score_layers:
        for _ in _sample_scores(run):
            pass


def _mean_ci(values: np.ndarray, settings: AnalysisSettings) -> tuple[float, float, float]:
    """Mean of per-sample values with a percentile bootstrap interval over samples."""
    return bootstrap_mean_ci(values, n_boot=settings.n_boot, level=settings.level, seed=settings.seed)


# -- tables -------------------------------------------------------------------------------------


def correlation_table(
    run: Run,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    layers: Sequence[int] | None = None,
    deltas: Sequence[str] | None = None,
) -> pd.DataFrame:
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


def never_activated_table(
    run: Run, settings: AnalysisSettings = AnalysisSettings(), *, deltas: Sequence[str] | None = None
) -> pd.DataFrame:
    """Never-activated ratio per dataset, layer and δ: mean over samples with a bootstrap CI.

    A sample's ratio is the share of its visual tokens with max_t p̄(t,l)_i ≤ δ (docs/design.md), read
    from its ``max_scores`` array; ``k/Nv`` thresholds resolve with the sample's own N_v.
    """
    check_run(run)
    deltas = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    layers = list(run.manifest.get("layers", recorded_layers(run)))
    n_visual = dict(zip(run.samples["sample_id"], run.samples["n_visual"], strict=True))
    ratios: dict[str, np.ndarray] = {}  # sample -> [len(deltas), L]
    for sample_id, max_scores in _sample_max_scores(run):
        ratios[sample_id] = np.stack(
            [never_activated_ratio(max_scores, Threshold.parse(d).resolve(int(n_visual[sample_id]))) for d in deltas]
        )
    rows = []
    datasets = (
        run.samples.groupby("dataset", sort=False)["sample_id"]
        if "dataset" in run.samples
        else [("", run.samples["sample_id"])]
    )
    for dataset, ids in datasets:
        stacked = np.stack([ratios[i] for i in ids])  # [samples, deltas, L]
        for j, delta in enumerate(deltas):
            for position, layer in enumerate(layers):
                mean, low, high = _mean_ci(stacked[:, j, position], settings)
                rows.append(
                    {
                        "dataset": dataset,
                        "layer": layer,
                        "delta": delta,
                        "n_samples": len(ids),
                        "never_activated": mean,
                        "never_activated_low": low,
                        "never_activated_high": high,
                    }
                )
    return pd.DataFrame(rows)


def _top_k(n_visual: int, fraction: float) -> int:
    return max(1, min(n_visual, round(fraction * n_visual)))


def step_dependence_table(run: Run, settings: AnalysisSettings = AnalysisSettings()) -> pd.DataFrame:
    """Jaccard of top-k visual sets between consecutive steps and against step 0, per layer.

    Each sample contributes its mean over its steps; the table gives the mean over samples
    with a bootstrap CI, and ``jaccard_chance``: the overlap two random sets of the same size
    would have (:func:`~vpstudy.stats.estimators.jaccard_chance`, averaged over the samples).
    Samples with a single step have no pair and are left out. One row per score layer (the
    layers whose p̄ the run keeps).
    """
    check_run(run)
    require_scores(run, "step dependence", at_least=1)
    layers = run.score_layers
    per_layer: dict[int, tuple[list[float], list[float]]] = {layer: ([], []) for layer in layers}
    chance = []
    for _, scores in _sample_scores(run):
        if scores.shape[0] < 2:
            continue
        k = _top_k(scores.shape[-1], settings.top_k_fraction)
        chance.append(jaccard_chance(scores.shape[-1], k))
        for position, layer in enumerate(layers):
            consecutive, against_first = step_dependence(scores[:, position], k)
            per_layer[layer][0].append(consecutive.mean())
            per_layer[layer][1].append(against_first.mean())
    rows = []
    for layer, (consecutive_means, first_means) in per_layer.items():
        c, c_low, c_high = _mean_ci(np.array(consecutive_means), settings)
        f, f_low, f_high = _mean_ci(np.array(first_means), settings)
        rows.append(
            {
                "layer": layer,
                "top_k_fraction": settings.top_k_fraction,
                "n_samples": len(consecutive_means),
                "jaccard_consecutive": c,
                "jaccard_consecutive_low": c_low,
                "jaccard_consecutive_high": c_high,
                "jaccard_vs_step0": f,
                "jaccard_vs_step0_low": f_low,
                "jaccard_vs_step0_high": f_high,
                "jaccard_chance": float(np.mean(chance)) if chance else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def step_dependence_curve(
    run: Run, layer: int, top_k_fraction: float = 0.1, max_step: int | None = None
) -> pd.DataFrame:
    """Mean Jaccard against step 0 and against the previous step, per step t ≥ 1, at one layer
    (for plotting): columns ``step, jaccard_vs_step0, jaccard_consecutive, n_samples``."""
    check_run(run)
    layer_position(run, layer, "the step dependence curve")
    records = []
    for sample_id, scores in _sample_scores(run, [layer]):
        if scores.shape[0] < 2:
            continue
        consecutive, against_first = step_dependence(scores[:, 0], _top_k(scores.shape[-1], top_k_fraction))
        for t in range(1, scores.shape[0]):
            records.append((sample_id, t, against_first[t - 1], consecutive[t - 1]))
    table = pd.DataFrame(records, columns=["sample_id", "step", "jaccard_vs_step0", "jaccard_consecutive"])
    if max_step is not None:
        table = table[table["step"] <= max_step]
    return (
        table.groupby("step")
        .agg(
            jaccard_vs_step0=("jaccard_vs_step0", "mean"),
            jaccard_consecutive=("jaccard_consecutive", "mean"),
            n_samples=("sample_id", "nunique"),
        )
        .reset_index()
    )


def layer_similarity(run: Run) -> tuple[list[int], np.ndarray]:
    """Layer-to-layer cosine similarity of p̄ (the paper's procedure): per sample the mean over
    its steps, then the mean over samples with equal weight, over the layers whose p̄ the run
    keeps (two at least). Returns (layers, [L, L])."""
    check_run(run)
    require_scores(run, "layer similarity", recorded_layers(run), at_least=2)
    matrices = [layer_cosine(scores) for _, scores in _sample_scores(run)]
    return run.score_layers, np.mean(matrices, axis=0)


def _annotated(run: Run, annotations: Sequence[StepAnnotation], layer: int) -> pd.DataFrame:
    """The steps rows of ``layer`` for the annotated steps, joined with their annotation."""
    if not annotations:
        raise AnalysisError(f"{run.path}: no annotated steps (no sample is on its reference path)")
    keys = pd.DataFrame(
        {
            "sample_id": [a.sample_id for a in annotations],
            "step": [a.step for a in annotations],
            "reads_image": [a.reads_image for a in annotations],
            "region": [a.region for a in annotations],
        }
    )
    table = run.steps[run.steps["layer"] == layer][["sample_id", "step", "mass"]]
    return keys.merge(table, on=["sample_id", "step"], how="inner", validate="one_to_one")


def _per_trace(frame: pd.DataFrame, x: str, y: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    groups = [g for _, g in frame.groupby("sample_id", sort=False)]
    return [g[x].to_numpy(dtype=np.float64) for g in groups], [g[y].to_numpy() for g in groups]


def mass_contrast_table(
    run: Run, annotations: Sequence[StepAnnotation], settings: AnalysisSettings = AnalysisSettings()
) -> pd.DataFrame:
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
        row = {
            "layer": layer,
            "n_samples": len(xs),
            "reading_steps": int(reads.sum()),
            "text_steps": int((~reads).sum()),
            "mass_reading": float(mass[reads].mean()) if reads.any() else float("nan"),
            "mass_text": float(mass[~reads].mean()) if (~reads).any() else float("nan"),
        }
        for name, statistic in (("auc", auc), ("ratio", mean_ratio)):
            estimate, low, high = cluster_bootstrap_ci(
                xs, ys, statistic, n_boot=settings.n_boot, level=settings.level, seed=settings.seed
            )
            row |= {name: estimate, f"{name}_low": low, f"{name}_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def localization_table(
    run: Run, annotations: Sequence[StepAnnotation], settings: AnalysisSettings = AnalysisSettings()
) -> pd.DataFrame:
    """Share of annotated steps with a region whose top-attended visual token (argmax of p̄)
    lies in that region, per layer, with a bootstrap CI over samples, against the chance rate
    (region size / N_v, averaged over the same steps). One row per score layer (the layers whose
    p̄ the run keeps)."""
    check_run(run)
    require_scores(run, "localization", at_least=1)
    layers = run.score_layers
    with_region = [a for a in annotations if a.region]
    if not with_region:
        raise AnalysisError(f"{run.path}: no annotated step refers to an image region")
    top, n_visual = {}, {}
    for sample_id, s in _sample_scores(run):
        top[sample_id], n_visual[sample_id] = s.argmax(axis=-1), s.shape[-1]  # [S, L]
    rows = []
    for position, layer in enumerate(layers):
        hits: dict[str, list[float]] = {}
        chance = []
        for a in with_region:
            hits.setdefault(a.sample_id, []).append(float(top[a.sample_id][a.step, position] in a.region))
            chance.append(len(a.region) / n_visual[a.sample_id])
        xs = [np.array(v) for v in hits.values()]
        estimate, low, high = cluster_bootstrap_ci(
            xs, xs, lambda x, _y: float(np.mean(x)), n_boot=settings.n_boot, level=settings.level, seed=settings.seed
        )
        rows.append(
            {
                "layer": layer,
                "n_samples": len(xs),
                "steps": len(chance),
                "localization": estimate,
                "localization_low": low,
                "localization_high": high,
                "chance": float(np.mean(chance)),
            }
        )
    return pd.DataFrame(rows)


def think_contrast_table(run: Run, settings: AnalysisSettings = AnalysisSettings()) -> pd.DataFrame:
    """Visual mass on the steps of a reasoning trace's ``<think>`` block vs. its answer, per layer.

    Phases come from the run alone (:func:`vpstudy.annotations.think_phases`). Effect sizes with a
    bootstrap CI over samples, as in :func:`mass_contrast_table`: ``auc`` (probability that a think
    step carries more mass than an answer step, over the pooled steps; 0.5 = no difference) and
    ``ratio`` (mean mass think / mean mass answer), plus the two means and step counts.

    Raises:
        AnalysisError: no recorded step is inside a ``<think>`` block.
    """
    from ..annotations import think_phases

    check_run(run)
    phases = think_phases(run)
    if not (phases["phase"] == "think").any():
        raise AnalysisError(f"{run.path}: no step is inside a <think> block")
    rows = []
    for layer in recorded_layers(run):
        table = run.steps[run.steps["layer"] == layer][["sample_id", "step", "mass"]]
        frame = phases.merge(table, on=["sample_id", "step"], how="inner", validate="one_to_one")
        frame["think"] = frame["phase"] == "think"
        xs, ys = _per_trace(frame, "mass", "think")
        think = frame["think"].to_numpy(dtype=bool)
        mass = frame["mass"].to_numpy(dtype=np.float64)
        row = {
            "layer": layer,
            "n_samples": len(xs),
            "think_steps": int(think.sum()),
            "answer_steps": int((~think).sum()),
            "mass_think": float(mass[think].mean()) if think.any() else float("nan"),
            "mass_answer": float(mass[~think].mean()) if (~think).any() else float("nan"),
        }
        for name, statistic in (("auc", auc), ("ratio", mean_ratio)):
            estimate, low, high = cluster_bootstrap_ci(
                xs, ys, statistic, n_boot=settings.n_boot, level=settings.level, seed=settings.seed
            )
            row |= {name: estimate, f"{name}_low": low, f"{name}_high": high}
        rows.append(row)
    return pd.DataFrame(rows)
