"""The project's figures, drawn from saved runs and result files only (no model is ever run).

One function per figure, each returning a :class:`matplotlib.figure.Figure` built without
pyplot (so the interactive backend of a notebook is left alone):

- :func:`fig_mass_over_steps`: visual mass per generated step of one sample, with the activation
  overlays of chosen steps on the sample's image (:func:`activation_overlay`);
- :func:`fig_mass_vs_active`: visual mass vs. active-token count, all steps pooled, per δ;
- :func:`fig_never_activated`: never-activated share of visual tokens per δ and dataset;
- :func:`fig_budget_dynamics`: the kept ratio fixed top-K, top-p and mass budgeting would choose
  at each step of one dense trace;
- :func:`fig_layer_similarity`: layer-to-layer cosine similarity of p̄;
- :func:`fig_latency`: sparse latency as a share of dense per visual-context length, from
  benchmark JSON files (:func:`load_latency_results`);
- :func:`fig_accuracy_vs_retention`: accuracy and generated length vs. kept visual fraction per
  pruning method, from evaluation comparison tables (:func:`load_comparisons`).

:func:`write_figures` draws all of them for a list of runs and saves each as PNG and PDF
(:func:`save_figure`); an absent input is reported as a skip, never raised. Statistics come
from :mod:`vpstudy.stats`; steps, layers and δ follow SPEC, Definitions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator, PercentFormatter
from PIL import Image
from tqdm.auto import tqdm

from .analysis import default_layer
from .rules import BudgetRule, BudgetRuleError, active_column
from .datasets import DatasetError, load_dataset
from .selection import top_p_mask
from .runs import Run, open_run
from .stats import (
    AnalysisError,
    AnalysisSettings,
    check_delta,
    check_layer,
    check_run,
    layer_position,
    layer_similarity,
    never_activated_table,
    pearson,
    recorded_deltas,
)
from .errors import VpstudyError

DPI = 150
DEFAULT_LEVELS = (50.0, 90.0)  # prune levels: the top 50% and the top 10% of visual tokens shown
OVERLAY_CMAP = "autumn_r"
OVERLAY_ALPHA = 0.6
DEFAULT_TOP_K = 0.05  # fixed top-K keep ratio of the budget dynamics figure
DEFAULT_TOP_P = 0.9  # top-p share of the step's visual mass
DEFAULT_BENCH_DIR = "bench/results"
MIN_DEFAULT_STEPS = 12  # the default sample is the first correct one with at least this many steps
COMPARISON_COLUMNS = ("method", "mean_kept_fraction", "accuracy", "accuracy_low", "accuracy_high", "mean_length")
LATENCY_COLUMNS = ("visual_tokens", "method", "prefill_s", "decode_s", "total_s")

__all__ = [
    "FigureInputError", "FigureReport", "LatencyResult", "activation_mask", "activation_overlay", "default_sample",
    "fig_activation_steps",
    "fig_accuracy_vs_retention", "fig_budget_dynamics", "fig_latency", "fig_layer_similarity", "fig_mass_over_steps",
    "fig_mass_vs_active", "fig_never_activated", "load_comparisons", "load_latency_results", "run_image",
    "save_figure", "spatial_grid", "top_p_counts", "write_figures",
]  # fmt: skip


class FigureInputError(VpstudyError):
    """A benchmark result or comparison table that exists but cannot be used; the message names it."""


@dataclass
class FigureReport:
    """What :func:`write_figures` did: every file written (PNG and PDF) and every figure skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- shared helpers ---------------------------------------------------------------------------


def save_figure(figure: Figure, stem: str | Path) -> list[Path]:
    """Save ``figure`` as ``<stem>.png`` (at :data:`DPI`) and ``<stem>.pdf``; returns both paths."""
    stem = Path(stem)
    paths = [stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.pdf")]
    for path in paths:
        figure.savefig(path, dpi=DPI)
    return paths


def _token_label(text: Any) -> str:
    """A generated token as shown in a title: quoted, newlines visible, no mathtext."""
    if not isinstance(text, str):
        return "?"
    return "“" + text.replace("\n", "\\n").replace("$", r"\$") + "”"


def _sample_row(run: Run, sample_id: str) -> pd.Series:
    rows = run.samples[run.samples["sample_id"] == sample_id]
    if rows.empty:
        raise AnalysisError(f"{run.path}: no sample {sample_id!r} in this run")
    return rows.iloc[0]


def _sample_steps(run: Run, sample_id: str, layer: int) -> pd.DataFrame:
    """The steps rows of one sample at one layer, ordered by step."""
    _sample_row(run, sample_id)
    table = run.steps[(run.steps["sample_id"] == sample_id) & (run.steps["layer"] == layer)]
    return table.sort_values("step").reset_index(drop=True)


def default_sample(run: Run, min_steps: int = MIN_DEFAULT_STEPS) -> str:
    """The sample the per-sample figures show by default: the first correct one with at least
    ``min_steps`` steps, else the first one."""
    samples = run.samples
    if samples.empty:
        raise AnalysisError(f"{run.path}: the run holds no recorded samples")
    correct = samples["correct"].eq(True) if "correct" in samples else pd.Series(False, index=samples.index)
    good = samples[correct & (samples["steps"] >= min_steps)]
    return str((good if len(good) else samples)["sample_id"].iloc[0])


def run_image(run: Run, sample_id: str) -> Image.Image:
    """The image of ``sample_id``, from the dataset the run was recorded from (its manifest).

    Raises:
        DatasetError: the manifest names no dataset, or the dataset, the example or its image is
            missing or unreadable.
    """
    path = (run.manifest.get("dataset") or {}).get("path")
    if not path:
        raise DatasetError(f"{run.path}: the run's manifest names no dataset")
    example = next((e for e in load_dataset(path) if e.id == sample_id), None)
    if example is None:
        raise DatasetError(f"{path}: no example with id {sample_id!r}")
    return example.image()


# -- activation overlay -----------------------------------------------------------------------


def spatial_grid(grid_shape: Sequence[int] | None, n_visual: int) -> tuple[int, int] | None:
    """``(h, w)`` of a grid that lays the ``n_visual`` tokens out on one image, else None.

    Leading 1s are dropped (Qwen's ``[1, h, w]``); a 1-D layout (LLaVA-OneVision AnyRes), several
    frames or crops (``[t > 1, h, w]``) or a grid whose size is not ``n_visual`` give None.
    """
    try:
        dims = [int(d) for d in grid_shape]  # type: ignore[union-attr]
    except (TypeError, ValueError):  # None, NaN: no layout recorded
        return None
    while len(dims) > 2 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 2 or dims[0] * dims[1] != n_visual:
        return None
    return dims[0], dims[1]


def activation_mask(scores: np.ndarray, grid_shape: Sequence[int], level: float) -> np.ma.MaskedArray:
    """The activation map of one step, as the paper draws it.

    Args:
        scores: [N_v] head-mean visual probabilities p̄ of one step at one layer.
        grid_shape: ``(h, w)`` (or ``(1, h, w)``) with h·w = N_v; tokens are numbered row-major.
        level: prune level in percent (0..100); 50 shows the top 50% of tokens, 90 the top 10%.

    Returns:
        [h, w] float64: scores min-max normalised to [0, 1] (all 0 when constant), masked where
        the normalised score is at or below its ``level``-th percentile.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    hw = spatial_grid(grid_shape, len(values))
    if hw is None:
        raise ValueError(f"grid shape {grid_shape} does not lay {len(values)} visual tokens out on one image")
    if not 0 <= level <= 100:
        raise ValueError(f"prune level must be a percentage in [0, 100], got {level}")
    low, high = values.min(), values.max()
    norm = (values - low) / (high - low) if high > low else np.zeros_like(values)
    grid = norm.reshape(hw)
    return np.ma.masked_where(grid <= np.percentile(grid, level), grid)


def _upsample_nearest(grid: np.ma.MaskedArray, height: int, width: int) -> np.ma.MaskedArray:
    """[h, w] -> [height, width] by nearest neighbour (pixel y takes grid row ⌊y·h/height⌋)."""
    rows = np.arange(height) * grid.shape[0] // height
    cols = np.arange(width) * grid.shape[1] // width
    return grid[np.ix_(rows, cols)]


def activation_overlay(ax: Axes, image: Image.Image | np.ndarray, scores: np.ndarray,
                       grid_shape: Sequence[int], level: float) -> AxesImage:  # fmt: skip
    """Draw ``image`` with the activation map of one step on top (see :func:`activation_mask`).

    The map is stretched over the whole image by nearest-neighbour upsampling; masked tokens are
    black and the rest use the colormap ``autumn_r``, all at alpha 0.6.

    Args:
        ax: where to draw; its ticks are removed.
        image: PIL image or [H, W, 3] array.
        scores: [N_v] p̄ of the step.
        grid_shape: ``(h, w)`` of the visual tokens, h·w = N_v, row-major.
        level: prune level in percent.

    Returns:
        The overlay image; ``get_array()`` is the [H, W] masked map at image resolution.
    """
    pixels = np.asarray(image)
    overlay = _upsample_nearest(activation_mask(scores, grid_shape, level), *pixels.shape[:2])
    cmap = colormaps[OVERLAY_CMAP].with_extremes(bad="black")
    ax.imshow(pixels, interpolation="nearest")
    drawn = ax.imshow(overlay, cmap=cmap, vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return drawn


def _even_steps(n_steps: int, count: int = 3) -> list[int]:
    """``count`` evenly spaced steps from 0 to ``n_steps - 1`` (fewer if the trace is shorter)."""
    return sorted({round(float(x)) for x in np.linspace(0, n_steps - 1, min(count, n_steps))})


def _overlay_inputs(run: Run, sample_id: str, layer: int, steps: Sequence[int] | None,
                    default_steps: Callable[[int], list[int]]) -> tuple[pd.DataFrame, np.ndarray, tuple[int, int], list[int]]:  # fmt: skip
    """What an overlay figure of one sample needs: its steps rows at ``layer``, its p̄ [S, N_v],
    its token grid (h, w) and the steps to draw (``default_steps(S)`` when None), all checked."""
    check_layer(run, layer)
    table = _sample_steps(run, sample_id, layer)
    sample = _sample_row(run, sample_id)
    scores = np.asarray(run.scores(sample_id)[:, layer_position(run, layer)], dtype=np.float64)  # [S, N_v]
    grid = spatial_grid(sample.get("grid_shape"), scores.shape[-1])
    if grid is None:
        raise AnalysisError(f"{run.path}: sample {sample_id!r} has grid shape {sample.get('grid_shape')}, "
                            "which does not lay its visual tokens out on one image")  # fmt: skip
    steps = list(steps) if steps is not None else default_steps(len(table))
    if not steps or any(not 0 <= t < len(table) for t in steps):
        raise AnalysisError(f"{run.path}: sample {sample_id!r} has steps 0..{len(table) - 1}, asked for {steps}")
    return table, scores, grid, steps


def fig_mass_over_steps(run: Run, sample_id: str, image: Image.Image | np.ndarray, *, layer: int,
                        steps: Sequence[int] | None = None, levels: Sequence[float] = DEFAULT_LEVELS) -> Figure:  # fmt: skip
    """Activation figure: visual mass per step (top), then one row of overlays per prune level.

    Args:
        run: an opened run.
        sample_id: the sample drawn.
        image: the sample's image (:func:`run_image`).
        layer: recorded text layer.
        steps: steps to show (dashed lines on top, one column each); default three evenly spaced.
        levels: prune levels in percent, one row each (default 50 and 90).
    """
    table, scores, grid, steps = _overlay_inputs(run, sample_id, layer, steps, _even_steps)
    tokens = table["token_text"].tolist() if "token_text" in table else [None] * len(table)

    figure = Figure(figsize=(max(7.0, 2.6 * len(steps)), 2.6 + 2.7 * len(levels)), layout="constrained")
    spec = figure.add_gridspec(1 + len(levels), len(steps), height_ratios=[1.1] + [2.0] * len(levels))
    top = figure.add_subplot(spec[0, :])
    top.plot(table["step"], table["mass"], marker="o", markersize=3, color="black", linewidth=1.2)
    for t in steps:
        top.axvline(t, color="tab:red", linestyle="--", linewidth=1)
    top.set_xlabel("Generated step t (predicts token t)")
    top.set_ylabel("Visual attention mass")
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(f"Sample {sample_id}, layer {layer}: visual mass per step and activation maps")
    for row, level in enumerate(levels):
        for col, t in enumerate(steps):
            ax = figure.add_subplot(spec[row + 1, col])
            activation_overlay(ax, image, scores[t], grid, level)
            ax.set_title(f"step {t}: {_token_label(tokens[t])}", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"top {100 - level:g}% shown")
    return figure


def fig_activation_steps(run: Run, sample_id: str, image: Image.Image | np.ndarray, *, layer: int,
                         level: float = 90.0, steps: Sequence[int] | None = None, columns: int = 6) -> Figure:  # fmt: skip
    """Step-by-step activation viewer: one overlay per step (default: every step), each titled
    with the step, the token it predicts and its visual mass.

    Args:
        run, sample_id, image: as :func:`fig_mass_over_steps`.
        layer: recorded text layer.
        level: prune level in percent (90 shows the top 10% of visual tokens).
        steps: steps to show, in order (default: all).
        columns: panels per row.
    """
    table, scores, grid, steps = _overlay_inputs(run, sample_id, layer, steps, lambda n: list(range(n)))
    rows = math.ceil(len(steps) / columns)
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows + 0.6), layout="constrained")
    figure.suptitle(f"Sample {sample_id}, layer {layer}: top {100 - level:g}% of visual tokens per step")
    for i, t in enumerate(steps):
        ax = figure.add_subplot(rows, columns, i + 1)
        activation_overlay(ax, image, scores[t], grid, level)
        ax.set_title(f"{t}: {_token_label(table['token_text'][t])}\nmass {table['mass'][t]:.2f}", fontsize=9)
    return figure


# -- pooled statistics ------------------------------------------------------------------------


def fig_mass_vs_active(run: Run, layer: int, *, deltas: Sequence[str] | None = None) -> Figure:
    """Visual mass vs. active-token count at ``layer``, all steps of all samples pooled.

    One series per δ (viridis), each with its least-squares line and Pearson r in the legend
    ("r undefined" when the count is constant). ``k/Nv`` thresholds use each sample's N_v.
    """
    check_run(run)
    check_layer(run, layer)
    labels = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    table = run.steps[run.steps["layer"] == layer]
    mass = table["mass"].to_numpy(dtype=np.float64)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, max(len(labels), 1)))
    figure = Figure(figsize=(8.5, 5.0), layout="constrained")
    ax = figure.add_subplot()
    for label, color in zip(labels, colors, strict=False):
        count = table[active_column(label)].to_numpy(dtype=np.float64)
        r = pearson(mass, count)
        legend = f"δ={label} (r undefined)" if math.isnan(r) else f"δ={label} (r={r:.2f})"
        ax.scatter(mass, count, s=7, alpha=0.35, color=color, linewidths=0, label=legend)
        if not math.isnan(r):
            slope, intercept = np.polyfit(mass, count, 1)
            xs = np.linspace(mass.min(), mass.max(), 2)
            ax.plot(xs, intercept + slope * xs, color=color, linewidth=1.8)
    ax.set_xlabel("Visual attention mass")
    ax.set_ylabel("Active token count")
    ax.set_title(f"Mass vs. active tokens, layer {layer} "
                 f"({table['sample_id'].nunique()} samples, {len(table)} steps pooled)")  # fmt: skip
    legend = ax.legend(title="Threshold", markerscale=2.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    return figure


def fig_never_activated(run: Run, layer: int, *, deltas: Sequence[str] | None = None,
                        settings: AnalysisSettings | None = None) -> Figure:  # fmt: skip
    """Never-activated share of visual tokens per δ (x) and dataset (bars), at ``layer``, with
    the bootstrap CI over samples of :func:`vpstudy.stats.never_activated_table` (``settings``:
    its resampling, default :class:`~vpstudy.stats.AnalysisSettings`, a 95% interval)."""
    check_layer(run, layer)
    settings = settings or AnalysisSettings()
    table = never_activated_table(run, settings, deltas=deltas)
    table = table[table["layer"] == layer]
    labels = list(dict.fromkeys(table["delta"]))
    datasets = list(dict.fromkeys(table["dataset"]))
    width = 0.8 / max(len(datasets), 1)
    colors = colormaps["tab10"](np.arange(len(datasets)) % 10)
    figure = Figure(figsize=(max(6.0, 1.1 * len(labels) * max(len(datasets), 1) + 2), 4.5), layout="constrained")
    ax = figure.add_subplot()
    for j, (dataset, color) in enumerate(zip(datasets, colors, strict=True)):
        rows = table[table["dataset"] == dataset].set_index("delta").loc[labels]
        mean = rows["never_activated"].to_numpy(dtype=np.float64)
        err = np.stack([mean - rows["never_activated_low"], rows["never_activated_high"] - mean])
        x = np.arange(len(labels)) + (j - (len(datasets) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=np.nan_to_num(err), capsize=3, color=color,
               label=f"{dataset or 'run'} (n={int(rows['n_samples'].iloc[0])})")  # fmt: skip
        tops = np.fmax(mean, rows["never_activated_high"].to_numpy(dtype=np.float64))
        for xi, top, value in zip(x, np.nan_to_num(tops), mean, strict=True):
            ax.text(xi, top + 0.01, f"{value:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(np.arange(len(labels)), [f"δ={d}" for d in labels])
    ax.set_xlabel("Activity threshold δ (k/Nv: k over the sample's visual-token count)")
    ax.set_ylabel("Never-activated share of visual tokens")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.1)  # room for the value labels
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"Visual tokens never above δ over the whole trace, layer {layer} ({settings.level:.0%} CI over samples)")
    ax.legend(title="Dataset")
    return figure


# -- budget dynamics --------------------------------------------------------------------------


def top_p_counts(scores: np.ndarray, p: float) -> np.ndarray:
    """Top-p keep counts: per step, the fewest visual tokens whose p̄ sum reaches ``p`` times
    that step's visual mass.

    Args:
        scores: [S, N_v] p̄ per step (non-negative), e.g. ``run.scores(id)[:, layer_position]``.
        p: share of the visual mass to cover, in (0, 1].

    Returns:
        [S] int64 counts in 1..N_v (1 for a step with no visual mass). A share reached up to a
        relative 1e-6 counts as reached (float error never adds a token).
    """
    if not 0 < p <= 1:
        raise ValueError(f"top-p share must be in (0, 1], got {p}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"scores must be [steps, N_v] with N_v > 0, got shape {values.shape}")
    probs = torch.from_numpy(values)
    # the pruner's own selection (vpstudy.pruning.TopP), so the figure shows what top-p keeps
    return top_p_mask(probs, p, torch.ones_like(probs, dtype=torch.bool)).sum(-1).numpy().astype(np.int64)


def _fixed_rule(ratio: float) -> BudgetRule:
    """Fixed top-K as a constant rule: K = clamp(floor(ratio · N_v), 1, N_v) at every step."""
    return BudgetRule(signal="mass", b_min=ratio, b_max=ratio, slope=0.0, intercept=ratio, name=f"fixed top-K ({ratio:.0%})")  # fmt: skip


def _check_rule(run: Run, rule: BudgetRule, layer: int) -> None:
    """Refuse a rule whose signal was not recorded, or fitted on another model or layer."""
    if rule.signal not in run.steps.columns:
        raise AnalysisError(f"{run.path}: budget rule {rule.name or rule.signal!r} needs signal "
                            f"{rule.signal!r}, which this run did not record")  # fmt: skip
    rule.check(config_hash=run.manifest.get("model_config_hash"), layer=layer)


def fig_budget_dynamics(run: Run, sample_id: str, layer: int, *, rules: Sequence[BudgetRule] | None = None,
                        top_k: float = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P) -> Figure:  # fmt: skip
    """Budget and retention dynamics of one sample at ``layer``, computed on its dense trace.

    Left axis: visual mass per step. Right axis: the kept share of N_v each method would choose
    at each step of that dense trace (nothing was pruned): fixed top-K (``top_k`` of N_v),
    top-p (:func:`top_p_counts` on ``run.scores``, share ``top_p`` of the step's visual mass),
    and each budget rule applied to its signal column (default: the paper's rule
    ``BudgetRule.paper(0.1, 0.01, 0.05)``).

    Raises:
        AnalysisError: a pruned run (not a dense trace), an unrecorded layer or rule signal.
        BudgetRuleError: a fitted rule of another model or layer.
    """
    check_layer(run, layer)
    if run.manifest.get("method"):
        raise AnalysisError(f"{run.path}: budget dynamics need a dense trace; this run was pruned "
                            f"({run.manifest['method']})")  # fmt: skip
    rules = list(rules) if rules is not None else [BudgetRule.paper(0.1, 0.01, 0.05)]
    for rule in rules:
        _check_rule(run, rule, layer)
    table = _sample_steps(run, sample_id, layer)
    n_visual = int(_sample_row(run, sample_id)["n_visual"])
    scores = run.scores(sample_id)[:, layer_position(run, layer)]  # [S, N_v]
    steps = table["step"].to_numpy()
    fixed = _fixed_rule(top_k).keep_count(np.zeros(len(steps)), n_visual)
    series = [(f"top-p (p={top_p:g} of the step's visual mass)", top_p_counts(scores, top_p), "-")]
    series += [(f"mass budget: {rule.name or rule.signal}", rule.keep_count(table[rule.signal].to_numpy(), n_visual), "-")
               for rule in rules]  # fmt: skip
    series.append((f"fixed top-K (K={fixed[0]}, {top_k:g}·N_v floored)", fixed, "--"))  # drawn last: dashed on top

    figure = Figure(figsize=(9.0, 4.8), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(steps, table["mass"], color="black", linewidth=1.6, marker="o", markersize=3, label="visual mass (left)")
    ax.set_xlabel("Generated step t (predicts token t)")
    ax.set_ylabel("Visual attention mass")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = ax.twinx()
    colors = colormaps["tab10"](np.arange(len(series)) % 10)
    for (label, counts, style), color in zip(series, colors, strict=True):
        right.step(steps, counts / n_visual, where="mid", color=color, linestyle=style, linewidth=1.8, label=label)
    right.set_yscale("log")
    right.set_ylim(0.5 / n_visual, 1.5)
    right.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    right.set_ylabel(f"Kept visual tokens (% of N_v = {n_visual}, log scale)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title(f"Budget dynamics on the dense trace (kept shares each method would choose; nothing pruned)\n"
                 f"sample {sample_id}, layer {layer}")  # fmt: skip
    return figure


def fig_layer_similarity(run: Run) -> Figure:
    """Heatmap of :func:`vpstudy.stats.layer_similarity` (mean over steps, then samples),
    viridis from min(0.5, matrix min) to 1.0, over the recorded layer indices."""
    layers, matrix = layer_similarity(run)
    figure = Figure(figsize=(max(5.0, 0.35 * len(layers) + 3), max(4.2, 0.35 * len(layers) + 2)), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.5, float(matrix.min())), vmax=1.0)
    ticks = np.arange(len(layers))
    step = max(1, len(layers) // 12)
    ax.set_xticks(ticks[::step], [str(x) for x in layers[::step]])
    ax.set_yticks(ticks[::step], [str(x) for x in layers[::step]])
    if len(layers) <= 10:
        for i in range(len(layers)):
            for j in range(len(layers)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if matrix[i, j] > 0.8 else "white")  # fmt: skip
    ax.set_xlabel("Text layer")
    ax.set_ylabel("Text layer")
    ax.set_title(f"Layer-to-layer cosine similarity of p̄ ({len(run.samples)} samples)")
    figure.colorbar(image, ax=ax, label="Cosine similarity (mean over steps, then samples)")
    return figure


# -- benchmark and evaluation results ---------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """One latency benchmark file: where it is, the device, and its rows (see :func:`load_latency_results`)."""

    path: Path
    device: str
    rows: pd.DataFrame


def _device_label(device: Any) -> str:
    if isinstance(device, dict):
        return " ".join(str(device[k]) for k in ("name", "type") if device.get(k)) or "unknown device"
    return str(device) if device else "unknown device"


def load_latency_results(bench_dir: str | Path) -> list[LatencyResult]:
    """Every latency result among the ``*.json`` files of ``bench_dir`` (none if it is absent).

    Schema of a latency file (other JSON files, e.g. recording benchmarks, are ignored)::

        {"kind": "latency",
         "device": "NVIDIA H100" | {"name": ..., "type": ...},
         "rows": [{"visual_tokens": 8192,        # visual-context length (int)
                   "method": "dense",            # "dense" or a sparse method's name
                   "prefill_s": 1.2, "decode_s": 8.5, "total_s": 9.7,   # seconds
                   "roofline_decode_s": 3.1},    # optional: ideal decode time, seconds
                  ...]}

    Every ``visual_tokens`` needs a ``dense`` row. Rows sharing (visual_tokens, method) are
    repeats; their median is used.

    Raises:
        FigureInputError: unreadable JSON, or a latency file with missing fields or no dense row.
    """
    folder = Path(bench_dir)
    if not folder.is_dir():
        return []
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FigureInputError(f"{path}: cannot be read as JSON ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != "latency":
            continue
        rows = pd.DataFrame(data.get("rows") or [])
        missing = [c for c in LATENCY_COLUMNS if c not in rows.columns]
        if rows.empty or missing:
            raise FigureInputError(f"{path}: latency rows need {', '.join(LATENCY_COLUMNS)}"
                                   + (f" (missing: {', '.join(missing)})" if missing else " (no rows)"))  # fmt: skip
        numeric = [c for c in (*LATENCY_COLUMNS[2:], "roofline_decode_s") if c in rows.columns]
        rows = rows.groupby(["visual_tokens", "method"], sort=False)[numeric].median().reset_index()
        lengths = set(rows["visual_tokens"])
        no_dense = sorted(lengths - set(rows.loc[rows["method"] == "dense", "visual_tokens"]))
        if no_dense:
            raise FigureInputError(f"{path}: no dense row for visual_tokens {no_dense}")
        results.append(LatencyResult(path, _device_label(data.get("device")), rows))
    return results


def fig_latency(result: LatencyResult) -> Figure:
    """Sparse latency as % of dense per visual-context length (horizontal bars), decode and
    total side by side; each bar labelled with its seconds and speedup over dense. A
    ``roofline_decode_s`` is marked with a diamond on the decode panel."""
    rows = result.rows
    lengths = sorted(rows["visual_tokens"].unique())
    methods = [m for m in dict.fromkeys(rows["method"]) if m != "dense"]
    colors = colormaps["viridis"](np.linspace(0.2, 0.8, max(len(methods), 1)))
    height = 0.8 / max(len(methods), 1)
    panels = (("decode_s", "Decode"), ("total_s", "Total (prefill + decode)"))
    dense = rows[rows["method"] == "dense"].set_index("visual_tokens")
    metrics = [metric for metric, _ in panels]
    shares = rows[metrics].to_numpy() / dense.loc[rows["visual_tokens"], metrics].to_numpy()  # [rows, 2]
    widest = 100 * max(1.0, float(np.nanmax(shares)))  # x range: the slowest bar, at least dense
    figure = Figure(figsize=(11.0, 2.2 + 1.0 * len(lengths) * max(len(methods), 1) ** 0.5), layout="constrained")
    for p, (metric, title) in enumerate(panels):
        ax = figure.add_subplot(1, 2, p + 1)
        roofline_labelled = False
        for j, (method, color) in enumerate(zip(methods, colors, strict=False)):
            mine = rows[rows["method"] == method].set_index("visual_tokens")
            for i, n in enumerate(lengths):
                if n not in mine.index:
                    continue
                y = i + ((len(methods) - 1) / 2 - j) * height  # first method on top
                seconds = float(mine.loc[n, metric])
                share = seconds / float(dense.loc[n, metric])
                ax.barh(y, 100 * share, height, color=color, label=method if i == 0 else None)
                ax.text(100 * share + 1.5, y, f"{seconds:.2f} s ({1 / share:.2f}×)", va="center", fontsize=9)
                roof = mine.loc[n].get("roofline_decode_s") if metric == "decode_s" else None
                if roof is not None and np.isfinite(roof):
                    ax.plot(100 * roof / dense.loc[n, metric], y, marker="D", color="black", markersize=5,
                            linestyle="none", label=None if roofline_labelled else "roofline (ideal)")  # fmt: skip
                    roofline_labelled = True
        ax.axvline(100, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(np.arange(len(lengths)), [f"{n:,} visual tokens\ndense {dense.loc[n, metric]:.2f} s" for n in lengths])
        ax.set_xlim(0, widest + 55)  # room for the labels
        ax.set_xlabel(f"{title} latency (% of dense)")
        ax.set_title(title)
        if p == 0:
            handles, labels = ax.get_legend_handles_labels()
            figure.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    figure.suptitle(f"Sparse vs. dense latency on {result.device} ({result.path.name})")
    return figure


def load_comparisons(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate evaluation comparison tables, one ``comparison.csv`` per path.

    Each CSV has one row per method with columns ``method``, ``mean_kept_fraction`` (mean kept
    share of visual tokens, 0..1), ``accuracy`` with ``accuracy_low``/``accuracy_high`` (a share
    and its CI, NaN allowed) and ``mean_length`` (mean generated tokens). A ``source`` column
    (the CSV's parent directory name, or its path when those repeat) is added.

    Raises:
        FigureInputError: a file that cannot be read or lacks a column.
    """
    tables = []
    names = [Path(p).parent.name or Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    for path, name in zip(paths, names, strict=True):
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError) as e:
            raise FigureInputError(f"{path}: cannot be read as CSV ({e})") from None
        missing = [c for c in COMPARISON_COLUMNS if c not in table.columns]
        if missing:
            raise FigureInputError(f"{path}: comparison table lacks column(s) {', '.join(missing)}")
        try:
            numbers = table[list(COMPARISON_COLUMNS[1:])].astype(np.float64)
        except ValueError as e:
            raise FigureInputError(f"{path}: non-numeric value in a numeric column ({e})") from None
        tables.append(numbers.assign(method=table["method"].astype(str), source=name))
    if not tables:
        return pd.DataFrame(columns=[*COMPARISON_COLUMNS, "source"])
    return pd.concat(tables, ignore_index=True)


def fig_accuracy_vs_retention(table: pd.DataFrame) -> Figure:
    """Accuracy (with its CI) and mean generated length vs. mean kept visual fraction, one point
    per method (and source), method names annotated. ``table`` is :func:`load_comparisons`'s."""
    if table.empty:
        raise FigureInputError("no comparison rows to draw")
    sources = list(dict.fromkeys(table["source"])) if "source" in table else [""]
    colors = colormaps["tab10"](np.arange(len(sources)) % 10)
    kept = table["mean_kept_fraction"].to_numpy(dtype=np.float64)
    log_x = bool((kept > 0).all() and kept.max() / kept.min() >= 10)
    figure = Figure(figsize=(11.0, 4.6), layout="constrained")
    panels = (("accuracy", "Accuracy"), ("mean_length", "Mean generated length (tokens)"))
    for p, (column, label) in enumerate(panels):
        ax = figure.add_subplot(1, 2, p + 1)
        for source, color in zip(sources, colors, strict=True):
            rows = table[table["source"] == source] if "source" in table else table
            x = rows["mean_kept_fraction"].to_numpy(dtype=np.float64)
            y = rows[column].to_numpy(dtype=np.float64)
            if column == "accuracy":
                err = np.nan_to_num(np.abs(np.stack([y - rows["accuracy_low"], rows["accuracy_high"] - y])))
                ax.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3, label=source or None)
            else:
                ax.plot(x, y, "o", color=color, label=source or None)
            for xi, yi, method in zip(x, y, rows["method"], strict=True):
                ax.annotate(method, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=9)
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)  # room for the method names
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.set_xlabel("Mean kept visual tokens (% of N_v" + (", log scale)" if log_x else ")"))
        ax.set_ylabel(label)
        if column == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if len(sources) > 1 and p == 0:
            ax.legend(title="Comparison")
    figure.suptitle("Accuracy and trace length vs. visual-token retention, per method (error bars: the accuracy CI of each table)")
    return figure


# -- driver -----------------------------------------------------------------------------------


class _Skip(Exception):
    """A figure that cannot be drawn because an input is absent; the message says which."""


Job = tuple[str, Callable[[], Figure]]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def _run_labels(paths: Sequence[Path]) -> list[str]:
    """File-name prefix of each run: its directory name, made unique when several share it."""
    if len(paths) <= 1:
        return [""] * len(paths)
    names = [_safe(p.name) for p in paths]
    if len(set(names)) < len(names):
        names = [_safe(f"{p.parent.name}-{p.name}") for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    return [f"{n}-" for n in names]


def _draw_mass_over_steps(run: Run, sample_id: str, layer: int) -> Figure:
    """:func:`fig_mass_over_steps` of one sample, or a skip when its image or layout is absent."""
    where = f"mass_over_steps of {run.path} (sample {sample_id}) skipped"
    sample = _sample_row(run, sample_id)
    grid = sample.get("grid_shape")
    if spatial_grid(grid, int(sample["n_visual"])) is None:
        shown = [int(d) for d in grid] if isinstance(grid, Sequence | np.ndarray) else grid
        raise _Skip(f"{where}: grid shape {shown} does not lay its visual tokens out on one image")
    try:
        image = run_image(run, sample_id)
    except DatasetError as e:
        raise _Skip(f"{where}: image not available ({e})") from None
    return fig_mass_over_steps(run, sample_id, image, layer=layer)


def _budget_rules(run: Run, layer: int, fitted: BudgetRule | None, notes: list[str]) -> list[BudgetRule]:
    """The paper's rule and the fitted one, each if it applies to ``run`` at ``layer`` (else a note)."""
    rules = []
    for rule in (BudgetRule.paper(0.1, 0.01, 0.05), fitted):
        if rule is None:
            continue
        try:
            _check_rule(run, rule, layer)
        except (AnalysisError, BudgetRuleError) as e:
            notes.append(f"budget_dynamics of {run.path}: rule {rule.name or rule.signal!r} left out ({e})")
            continue
        rules.append(rule)
    return rules


def _run_jobs(run: Run, prefix: str, layer: int | None, fitted: BudgetRule | None,
              samples: Sequence[str] | None, notes: list[str]) -> list[Job]:  # fmt: skip
    """The figures of one run, in figure order; notes collect what is left out."""
    check_run(run)
    layer = check_layer(run, layer) if layer is not None else default_layer(run)
    if samples is None:
        chosen, suffix = [default_sample(run)], {}
    else:
        known = set(run.sample_ids)
        chosen = [s for s in samples if s in known]
        notes += [f"per-sample figures of {run.path}: no sample {s!r} in this run" for s in samples if s not in known]
        suffix = {s: f"-{_safe(s)}" for s in chosen}
    jobs: list[Job] = [(f"{prefix}mass_over_steps{suffix.get(s, '')}", partial(_draw_mass_over_steps, run, s, layer))
                       for s in chosen]  # fmt: skip
    jobs.append((f"{prefix}mass_vs_active", partial(fig_mass_vs_active, run, layer)))
    jobs.append((f"{prefix}never_activated", partial(fig_never_activated, run, layer)))
    if run.manifest.get("method"):
        notes.append(f"budget_dynamics of {run.path} skipped: it needs a dense run, this one was pruned "
                     f"({run.manifest['method']})")  # fmt: skip
    else:
        rules = _budget_rules(run, layer, fitted, notes)
        jobs += [(f"{prefix}budget_dynamics{suffix.get(s, '')}", partial(fig_budget_dynamics, run, s, layer, rules=rules))
                 for s in chosen]  # fmt: skip
    jobs.append((f"{prefix}layer_similarity", partial(fig_layer_similarity, run)))
    return jobs


def _latency_jobs(bench_dir: str | Path | None, notes: list[str]) -> list[Job]:
    if bench_dir is None:
        notes.append("latency skipped: no benchmark results directory given")
        return []
    if not Path(bench_dir).is_dir():
        notes.append(f"latency skipped: benchmark results directory {bench_dir} not found")
        return []
    results = load_latency_results(bench_dir)
    if not results:
        notes.append(f"latency skipped: no latency results (JSON with \"kind\": \"latency\") in {bench_dir}")
    names = ["latency"] if len(results) == 1 else [f"latency-{_safe(r.path.stem)}" for r in results]
    return [(name, partial(fig_latency, result)) for name, result in zip(names, results, strict=True)]


def _comparison_jobs(comparisons: Sequence[str | Path], notes: list[str]) -> list[Job]:
    present = [Path(p) for p in comparisons if Path(p).is_file()]
    notes += [f"accuracy_vs_retention: comparison table {p} not found" for p in comparisons if not Path(p).is_file()]
    table = load_comparisons(present)
    if table.empty:
        notes.append("accuracy_vs_retention skipped: no evaluation comparison table (comparison.csv) with rows given")
        return []
    return [("accuracy_vs_retention", partial(fig_accuracy_vs_retention, table))]


def write_figures(runs: Sequence[str | Path], out: str | Path, *, layer: int | None = None,
                  rule: str | Path | None = None, bench_dir: str | Path | None = DEFAULT_BENCH_DIR,
                  comparisons: Sequence[str | Path] = (), samples: Sequence[str] | None = None,
                  progress: bool = True) -> FigureReport:  # fmt: skip
    """Draw every figure for every run, plus the latency and accuracy figures, into ``out``.

    Args:
        runs: run directories; with several, file names start with the run directory's name.
        out: output directory (created); each figure is ``<name>.png`` and ``<name>.pdf``.
        layer: layer of the per-layer figures (default: :func:`vpstudy.analysis.default_layer`).
        rule: a fitted budget rule JSON, added to the budget dynamics figure.
        bench_dir: directory of benchmark JSON files (:func:`load_latency_results`).
        comparisons: evaluation ``comparison.csv`` files (:func:`load_comparisons`).
        samples: samples of the per-sample figures (names get ``-<sample id>``); default one per
            run, :func:`default_sample`.
        progress: show a progress bar.

    Returns:
        The files written and one message per figure (or part of one) left out because an input
        is absent: a run directory, the run's dataset or image, a sample, the rule file, the
        benchmark results, a comparison table. Nothing is written outside ``out``.

    Raises:
        RunStoreError / AnalysisError / BudgetRuleError / FigureInputError: an input that exists
            but is malformed (e.g. an empty run, a rule file that is not a rule), or a ``layer``
            the run did not record.
    """
    out = Path(out)
    runs = [runs] if isinstance(runs, str | Path) else runs
    report = FigureReport()
    fitted = None
    if rule is not None:
        if Path(rule).is_file():
            fitted = BudgetRule.load(rule)
        else:
            report.skipped.append(f"budget_dynamics: budget rule {rule} not found; only the paper's rule is drawn")
    jobs: list[Job] = []
    paths = [Path(r) for r in runs]
    for path, prefix in zip(paths, _run_labels(paths), strict=True):
        if not path.is_dir():
            report.skipped.append(f"run {path}: no such run directory; its figures were skipped")
            continue
        jobs += _run_jobs(open_run(path), prefix, layer, fitted, samples, report.skipped)
    if not runs:
        report.skipped.append("run figures skipped: no run given")
    jobs += _latency_jobs(bench_dir, report.skipped)
    jobs += _comparison_jobs(comparisons, report.skipped)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in tqdm(jobs, desc="figures", unit="figure", disable=not progress):
        try:
            figure = draw()
        except _Skip as e:
            report.skipped.append(str(e))
            continue
        report.written += save_figure(figure, out / name)
    return report
