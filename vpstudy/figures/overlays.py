"""Activation maps of single steps on the sample's image: the activation figure (visual mass
per step, then the maps of chosen steps) and the step-by-step viewer.

An activation map (:func:`activation_mask`) shows the visual tokens above a prune level of one
step's p̄ (head-mean visual attention of the step at one layer, [N_v]), min-max normalised
within the step; :func:`activation_overlay` lays it over the image in grey, semi-transparent,
so the image stays visible beneath and every colour is the map's. The figures add a colour bar
for the normalised p̄, the input image on its own in colour, and, where the dataset annotates
them, the outline of the region the predicted token refers to (``token_boxes``,
:mod:`vpstudy.annotations`), with a legend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator
from PIL import Image

from ..annotations import has_annotations, step_annotations
from ..datasets import DatasetError, load_dataset
from ..runs import Run
from ..stats import AnalysisError, check_layer, layer_position
from .common import sample_row, sample_steps, spatial_grid, token_label

DEFAULT_LEVELS = (50.0, 90.0)  # prune levels: the top 50% and the top 10% of visual tokens shown
OVERLAY_CMAP = "autumn_r"  # yellow (least attended of the kept) to red (most)
OVERLAY_ALPHA = 0.6  # opacity of the kept tokens' colour; hidden tokens show the image as it is
REGION_COLOR = "cyan"

Regions = Mapping[int, Sequence[int]]  # step -> visual-token indices (row-major) it refers to


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


def overlay_cmap() -> Colormap:
    """The colormap of the kept tokens (:data:`OVERLAY_CMAP`), hidden (masked) tokens transparent."""
    return colormaps[OVERLAY_CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


def grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W] luminance of an image in [0, 1] (ITU-R 601 weights; an alpha channel is dropped).
    8-bit images are scaled by 1/255; float images are taken as already in [0, 1]."""
    pixels = np.asarray(image)
    values = pixels.astype(np.float64)
    if values.ndim == 3:
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114]) if values.shape[-1] >= 3 else values[..., 0]
    return values / 255.0 if pixels.dtype == np.uint8 else values


def activation_overlay(
    ax: Axes,
    image: Image.Image | np.ndarray,
    scores: np.ndarray,
    grid_shape: Sequence[int],
    level: float,
    *,
    in_grey: bool = True,
) -> AxesImage:
    """Draw ``image`` with the activation map of one step on top (see :func:`activation_mask`).

    The image is drawn in grey (its luminance, :func:`grey`; ``in_grey=False``: in colour), so
    that every colour on the panel is the map's; the map is stretched over it by
    nearest-neighbour upsampling, the kept tokens coloured by :func:`overlay_cmap` at opacity
    :data:`OVERLAY_ALPHA` (the image shows through them) and the hidden tokens transparent.

    Args:
        ax: where to draw; its ticks are removed.
        image: PIL image or [H, W, 3] array.
        scores: [N_v] p̄ of the step.
        grid_shape: ``(h, w)`` of the visual tokens, h·w = N_v, row-major.
        level: prune level in percent.
        in_grey: draw the image in grey (default) rather than in colour.

    Returns:
        The overlay image; ``get_array()`` is the [H, W] masked map at image resolution.
    """
    pixels = np.asarray(image)
    overlay = _upsample_nearest(activation_mask(scores, grid_shape, level), *pixels.shape[:2])
    if in_grey:
        ax.imshow(grey(pixels), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(pixels, interpolation="nearest")
    drawn = ax.imshow(overlay, cmap=overlay_cmap(), vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return drawn


def region_outline(ax: Axes, region: Sequence[int], grid_shape: tuple[int, int], image_size: tuple[int, int]) -> None:
    """Outline the union of the visual tokens ``region`` (row-major indices on ``grid_shape``)
    on an image of ``image_size`` = (height, width) pixels: only the region's border is drawn,
    dashed in :data:`REGION_COLOR` over a dark stroke."""
    h, w = grid_shape
    height, width = image_size
    cells = {(int(i) // w, int(i) % w) for i in region}
    sy, sx = height / h, width / w
    segments = []
    for r, c in cells:
        x0, y0, x1, y1 = c * sx - 0.5, r * sy - 0.5, (c + 1) * sx - 0.5, (r + 1) * sy - 0.5
        if (r - 1, c) not in cells:
            segments.append([(x0, y0), (x1, y0)])
        if (r + 1, c) not in cells:
            segments.append([(x0, y1), (x1, y1)])
        if (r, c - 1) not in cells:
            segments.append([(x0, y0), (x0, y1)])
        if (r, c + 1) not in cells:
            segments.append([(x1, y0), (x1, y1)])
    if segments:
        lines = LineCollection(segments, colors=REGION_COLOR, linewidths=2.0, linestyles=(0, (3, 2)), zorder=5)
        lines.set_path_effects([withStroke(linewidth=3.5, foreground="black")])
        ax.add_collection(lines)


def sample_regions(run: Run, sample_id: str) -> dict[int, tuple[int, ...]]:
    """The image region each step of ``sample_id`` refers to, from the run's dataset annotations.

    Returns:
        step -> visual-token indices (row-major), for the on-path steps whose token refers to a
        region (:func:`vpstudy.annotations.step_annotations`); empty when the dataset gives no
        ``token_boxes``.

    Raises:
        DatasetError: the run's dataset is missing or unreadable.
        AnnotationError: its annotations do not fit the run.
    """
    path = (run.manifest.get("dataset") or {}).get("path")
    if not path:
        raise DatasetError(f"{run.path}: the run's manifest names no dataset")
    dataset = load_dataset(path)
    if not has_annotations(dataset, "token_boxes"):
        return {}
    return {a.step: a.region for a in step_annotations(run, dataset) if a.sample_id == sample_id and a.region}


def _even_steps(n_steps: int, count: int = 3) -> list[int]:
    """``count`` evenly spaced steps from 0 to ``n_steps - 1`` (fewer if the trace is shorter)."""
    return sorted({round(float(x)) for x in np.linspace(0, n_steps - 1, min(count, n_steps))})


def _steps_with_region(n_steps: int, regions: Regions) -> list[int]:
    """Three evenly spaced steps (:func:`_even_steps`), the middle one replaced by the first
    step whose token refers to an image region, when there is one in the trace."""
    steps = _even_steps(n_steps)
    first = min((t for t in regions if 0 <= t < n_steps), default=None)
    if first is not None and first not in steps and len(steps) == 3:
        steps = sorted({steps[0], first, steps[2]})
    return steps


OverlayInputs = tuple[pd.DataFrame, np.ndarray, tuple[int, int], list[int]]


def _overlay_inputs(
    run: Run, sample_id: str, layer: int, steps: Sequence[int] | None, default_steps: Callable[[int], list[int]]
) -> OverlayInputs:
    """What an overlay figure of one sample needs: its steps rows at ``layer``, its p̄ [S, N_v],
    its token grid (h, w) and the steps to draw (``default_steps(S)`` when None), all checked."""
    check_layer(run, layer)
    table = sample_steps(run, sample_id, layer)
    sample = sample_row(run, sample_id)
    position = layer_position(run, layer, "activation overlays")  # MissingScoresError: not kept at that layer
    scores = np.asarray(run.scores(sample_id)[:, position], dtype=np.float64)  # [S, N_v]
    grid = spatial_grid(sample.get("grid_shape"), scores.shape[-1])
    if grid is None:
        raise AnalysisError(
            f"{run.path}: sample {sample_id!r} has grid shape {sample.get('grid_shape')}, "
            "which does not lay its visual tokens out on one image"
        )
    steps = list(steps) if steps is not None else default_steps(len(table))
    if not steps or any(not 0 <= t < len(table) for t in steps):
        raise AnalysisError(f"{run.path}: sample {sample_id!r} has steps 0..{len(table) - 1}, asked for {steps}")
    return table, scores, grid, steps


def _image_panel(ax: Axes, image: Image.Image | np.ndarray, grid: tuple[int, int]) -> None:
    pixels = np.asarray(image)
    ax.imshow(pixels, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    height, width = pixels.shape[:2]
    ax.set_title(f"input image ({width}×{height} px,\n{grid[0]}×{grid[1]} visual tokens)", fontsize=10)


def _decode_aids(
    figure: Figure,
    overlay_axes: list[Axes],
    levels: Sequence[float],
    regions_drawn: bool,
    image: Image.Image | np.ndarray,
    quantity: str = "p̄ of the step",
) -> None:
    """The colour bar of the normalised p̄ beside ``overlay_axes`` and the legend of what the
    colours and outlines mean, below the figure. The bar's colours are blended, as the map's
    are, at :data:`OVERLAY_ALPHA` over the image's mean grey."""
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[OVERLAY_CMAP])
    bar = figure.colorbar(mappable, ax=overlay_axes, location="right", shrink=0.9, alpha=OVERLAY_ALPHA)
    background = float(np.clip(grey(image).mean(), 0.0, 1.0))
    bar.ax.set_facecolor(str(background))
    bar.set_label(f"{quantity}, min–max normalised\n(0: least-attended token, 1: most)")
    kept = ", ".join(f"top {100 - level:g}%" for level in levels)
    swatch = OVERLAY_ALPHA * np.asarray(colormaps[OVERLAY_CMAP](0.5)[:3]) + (1 - OVERLAY_ALPHA) * background
    handles: list[Artist] = [
        Patch(facecolor=tuple(swatch), label=f"kept visual token ({kept} of p̄), coloured by its p̄"),
        Patch(facecolor=str(background), edgecolor="0.4", label="not kept: the image, in grey"),
    ]
    if regions_drawn:
        handles.append(
            Line2D(
                [],
                [],
                color=REGION_COLOR,
                linewidth=2.0,
                linestyle=(0, (3, 2)),
                path_effects=[withStroke(linewidth=3.5, foreground="black")],
                label="region the predicted token refers to (dataset annotation)",
            )
        )
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2), fontsize=9, frameon=False)


def fig_mass_over_steps(
    run: Run,
    sample_id: str,
    image: Image.Image | np.ndarray,
    *,
    layer: int,
    steps: Sequence[int] | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    regions: Regions | None = None,
) -> Figure:
    """Activation figure: the input image and the visual mass per step (top), then one row of
    activation maps per prune level, one column per chosen step.

    Args:
        run: an opened run.
        sample_id: the sample drawn.
        image: the sample's image (:func:`~vpstudy.figures.run_image`).
        layer: recorded text layer.
        steps: steps to show (dashed lines on top, one column each); default three evenly
            spaced, the middle one replaced by the first step with a region when ``regions`` has one.
        levels: prune levels in percent, one row each (default 50 and 90).
        regions: step -> visual-token indices the step's token refers to
            (:func:`sample_regions`), outlined on that step's maps; default none.
    """
    regions = regions or {}
    table, scores, grid, steps = _overlay_inputs(run, sample_id, layer, steps, lambda n: _steps_with_region(n, regions))
    tokens = table["token_text"].tolist() if "token_text" in table else [None] * len(table)
    size = np.asarray(image).shape[:2]

    figure = Figure(figsize=(max(8.0, 2.7 * len(steps) + 1.6), 3.4 + 2.7 * len(levels)), layout="constrained")
    outer = figure.add_gridspec(2, 1, height_ratios=[1.25, 2.0 * len(levels)])
    top = outer[0].subgridspec(1, 2, width_ratios=[1.0, 3.2])
    _image_panel(figure.add_subplot(top[0, 0]), image, grid)
    curve = figure.add_subplot(top[0, 1])
    curve.plot(table["step"], table["mass"], marker="o", markersize=3, color="black", linewidth=1.2)
    for t in steps:
        curve.axvline(t, color="tab:red", linestyle="--", linewidth=1)
    curve.set_xlabel("Generated step t (predicts token t); dashed: steps drawn below")
    curve.set_ylabel("Visual attention mass")
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set_title(f"Sample {sample_id}, layer {layer}: visual mass per step")
    maps = outer[1].subgridspec(len(levels), len(steps))
    overlay_axes = []
    for row, level in enumerate(levels):
        for col, t in enumerate(steps):
            ax = figure.add_subplot(maps[row, col])
            activation_overlay(ax, image, scores[t], grid, level)
            if t in regions:
                region_outline(ax, regions[t], grid, size)
            ax.set_title(f"step {t}: {token_label(tokens[t])}", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"top {100 - level:g}% kept")
            overlay_axes.append(ax)
    _decode_aids(figure, overlay_axes, levels, any(t in regions for t in steps), image)
    return figure


def fig_activation_steps(
    run: Run,
    sample_id: str,
    image: Image.Image | np.ndarray,
    *,
    layer: int,
    level: float = 90.0,
    steps: Sequence[int] | None = None,
    columns: int = 6,
    regions: Regions | None = None,
) -> Figure:
    """Step-by-step activation viewer: the input image, then one map per step (default: every
    step), each titled with the step, the token it predicts and its visual mass.

    Args:
        run: an opened run.
        sample_id: the sample drawn.
        image: the sample's image (:func:`~vpstudy.figures.run_image`).
        layer: recorded text layer.
        level: prune level in percent (90 shows the top 10% of visual tokens).
        steps: steps to show, in order (default: all).
        columns: panels per row.
        regions: as :func:`fig_mass_over_steps`.
    """
    table, scores, grid, steps = _overlay_inputs(run, sample_id, layer, steps, lambda n: list(range(n)))
    regions = regions or {}
    size = np.asarray(image).shape[:2]
    rows = math.ceil((len(steps) + 1) / columns)
    figure = Figure(figsize=(2.2 * columns + 1.2, 2.4 * rows + 1.2), layout="constrained")
    figure.suptitle(f"Sample {sample_id}, layer {layer}: top {100 - level:g}% of visual tokens per step")
    _image_panel(figure.add_subplot(rows, columns, 1), image, grid)
    overlay_axes = []
    for i, t in enumerate(steps):
        ax = figure.add_subplot(rows, columns, i + 2)
        activation_overlay(ax, image, scores[t], grid, level)
        if t in regions:
            region_outline(ax, regions[t], grid, size)
        ax.set_title(f"{t}: {token_label(table['token_text'][t])}\nmass {table['mass'][t]:.2f}", fontsize=9)
        overlay_axes.append(ax)
    _decode_aids(figure, overlay_axes, [level], any(t in regions for t in steps), image)
    return figure


def fig_trace_max(
    run: Run,
    sample_id: str,
    image: Image.Image | np.ndarray,
    *,
    layers: Sequence[int] | None = None,
    level: float = 90.0,
    columns: int = 6,
) -> Figure:
    """Where a trace ever looked: the map of the running maximum of p̄ over all its steps, one
    panel per recorded layer, over the image.

    ``max_scores`` ([L, N_v], the per-token maximum of p̄ over the trace) is kept under every
    store policy (:mod:`vpstudy.storage`), so this figure needs no per-step p̄: it is what the
    never-activated share counts (a token outside every panel's map at a low level was never
    active). Each panel shows the tokens above ``level`` of its layer's maximum map, min–max
    normalised within the layer, as :func:`activation_overlay` draws a step.

    Args:
        run: an opened run.
        sample_id: the sample drawn.
        image: the sample's image (:func:`~vpstudy.figures.run_image`).
        layers: recorded text layers to draw (default: every recorded layer).
        level: prune level in percent (default 90: the top 10% shown).
        columns: panels per row.
    """
    recorded = list(run.manifest["layers"])
    layers = recorded if layers is None else list(layers)
    for layer in layers:
        check_layer(run, layer)
    maxima = np.asarray(run.arrays(sample_id)["max_scores"], dtype=np.float64)  # [L, N_v]
    sample = sample_row(run, sample_id)
    grid = spatial_grid(sample.get("grid_shape"), maxima.shape[-1])
    if grid is None:
        raise AnalysisError(
            f"{run.path}: sample {sample_id!r} has grid shape {sample.get('grid_shape')}, "
            "which does not lay its visual tokens out on one image"
        )
    n_cols = min(columns, len(layers) + 1)
    n_rows = math.ceil((len(layers) + 1) / n_cols)
    figure = Figure(figsize=(2.6 * n_cols + 1.2, 2.7 * n_rows + 0.9), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    _image_panel(axes[0], image, grid)
    for ax, layer in zip(axes[1:], layers, strict=False):
        activation_overlay(ax, image, maxima[recorded.index(layer)], grid, level)
        ax.set_title(f"layer {layer}: max over {int(sample['steps'])} steps", fontsize=10)
    for ax in axes[len(layers) + 1 :]:
        ax.set_axis_off()
    figure.suptitle(f"Sample {sample_id}: running maximum of p̄ over the trace (max_scores), top {100 - level:g}%")
    _decode_aids(figure, list(axes[1 : len(layers) + 1]), [level], False, image, "max of p̄ over the steps")
    return figure
