"""Accuracy and generated length vs. retention, one point per pruning method, from evaluation
comparison tables (``vpstudy evaluate --method all`` writes ``comparison.csv``).

Points are numbered; the numbers are spread apart (with leader lines) where points crowd, and a
side table gives each number's method with its kept share, accuracy (CI) and length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .common import FigureInputError

COMPARISON_COLUMNS = ("method", "mean_kept_fraction", "accuracy", "accuracy_low", "accuracy_high", "mean_length")
LABEL_HEIGHT = 0.06  # a number label's height, in axes fractions
LABEL_CHAR = 0.022  # one digit's width, in axes fractions


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
        except (TypeError, ValueError) as e:
            raise FigureInputError(f"{path}: non-numeric value in a numeric column ({e})") from None
        tables.append(numbers.assign(method=table["method"].astype(str), source=name))
    if not tables:
        return pd.DataFrame(columns=[*COMPARISON_COLUMNS, "source"])
    return pd.concat(tables, ignore_index=True)


def spread_labels(
    fx: np.ndarray,
    fy: np.ndarray,
    widths: np.ndarray,
    *,
    height: float = LABEL_HEIGHT,
    bars: tuple[np.ndarray, np.ndarray] | None = None,
    max_shift: int = 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Label positions (centres, axes fractions) that overlap neither each other nor any point
    (nor, with ``bars``, any point's error bar).

    Labels are placed one at a time (left to right, then bottom to top), each at the free slot
    nearest its point: slots lie in columns right and left of the point (the first just clear
    of it) and rows of one label height above and below. A label with no free slot within
    ``max_shift`` rows and columns takes the slot that overlaps least.

    Args:
        fx: [n] points' x, in axes fractions (0..1).
        fy: [n] points' y, in axes fractions (0..1).
        widths: [n] label widths, axes fractions.
        height: label height, axes fractions.
        bars: ``(low, high)``, [n] each: a vertical error bar through every point, axes fractions.
        max_shift: most rows and columns a label moves from its point.

    Returns:
        ``(lx, ly)``: [n] label centres, axes fractions, inside the axes.
    """
    fx, fy, widths = (np.asarray(a, dtype=np.float64) for a in (fx, fy, widths))
    low, high = fy, fy  # no bar: a bar of no length
    if bars is not None:  # a bound that is NaN (no interval) ends the bar at the point
        low, high = (np.where(np.isnan(b), fy, b) for b in (np.asarray(b, dtype=np.float64) for b in bars))
    marker = 0.02  # half a marker's extent, axes fractions
    cap = 0.012  # half an error bar's cap width, axes fractions
    lo, hi = height / 2, 1 - height / 2
    lx, ly = np.zeros(len(fx)), np.zeros(len(fx))
    placed: list[int] = []

    def clash(i: int, x: float, y: float) -> float:
        """How much a label of ``i`` at (x, y) overlaps the placed labels, every point and bar."""
        total = 0.0
        for j in placed:
            ox, oy = (widths[i] + widths[j]) / 2 - abs(x - lx[j]), height - abs(y - ly[j])
            total += max(ox, 0) * max(oy, 0)
        ox = widths[i] / 2 + marker - np.abs(x - fx)
        oy = height / 2 + marker - np.abs(y - fy)
        total += float((np.clip(ox, 0, None) * np.clip(oy, 0, None)).sum())
        ox = widths[i] / 2 + cap - np.abs(x - fx)  # the bar: from low to high at the point's x
        oy = np.minimum(y + height / 2, high) - np.maximum(y - height / 2, low)
        return total + float((np.clip(ox, 0, None) * np.clip(oy, 0, None)).sum())

    for i in sorted(range(len(fx)), key=lambda k: (fx[k], fy[k])):
        offset = marker + 0.004 + widths[i] / 2  # clear of its own point
        columns = [sign * (offset + c * (widths[i] + 0.01)) for c in range(max_shift) for sign in (1, -1)]
        xs = [fx[i] + dx for dx in columns if widths[i] / 2 <= fx[i] + dx <= 1 - widths[i] / 2]
        ys = [y for y in (fy[i] + m * height * 1.05 for m in range(-max_shift, max_shift + 1)) if lo <= y <= hi]
        slots = sorted(
            ((x, y) for x in xs for y in ys),  # nearest first; at equal distance right, then lower
            key=lambda p: (round((p[0] - fx[i]) ** 2 + (p[1] - fy[i]) ** 2, 9), p[0] < fx[i], p[1]),
        )
        fallback = (float(np.clip(fx[i] + offset, widths[i] / 2, 1 - widths[i] / 2)), float(np.clip(fy[i], lo, hi)))
        slots = slots or [fallback]
        free = next(((x, y) for x, y in slots if clash(i, x, y) == 0), None)
        lx[i], ly[i] = free if free is not None else min(slots, key=lambda p: clash(i, *p))
        placed.append(i)
    return lx, ly


def _fractions(ax: Axes, x: np.ndarray, y: np.ndarray, log_x: bool) -> tuple[np.ndarray, np.ndarray]:
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fx = (np.log10(x) - np.log10(x0)) / (np.log10(x1) - np.log10(x0)) if log_x else (x - x0) / (x1 - x0)
    return fx, (y - y0) / (y1 - y0)


def _limits(values: np.ndarray, log: bool, low_pad: float, high_pad: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    if log:
        span = np.log10(hi) - np.log10(lo)
        return 10 ** (np.log10(lo) - low_pad * span), 10 ** (np.log10(hi) + high_pad * span)
    span = (hi - lo) or max(abs(hi), 1.0)
    return lo - low_pad * span, hi + high_pad * span


def _table_text(table: pd.DataFrame, several: bool) -> str:
    """The side table: number, method, kept share, accuracy [CI], length (and source)."""
    width = max(6, *(len(m) for m in table["method"]))
    lines = [f"{'#':>2}  {'method':<{width}}  {'kept':>6}  {'accuracy [CI]':<19}  {'length':>6}"]
    for i, row in enumerate(table.itertuples(index=False), start=1):
        ci = (
            ""
            if np.isnan(row.accuracy_low) or np.isnan(row.accuracy_high)
            else f"[{100 * row.accuracy_low:.0f}, {100 * row.accuracy_high:.0f}]"
        )
        source = f"  {row.source}" if several else ""
        lines.append(
            f"{i:>2}  {row.method:<{width}}  {100 * row.mean_kept_fraction:>5.1f}%  "
            f"{100 * row.accuracy:>5.1f}% {ci:<12}  {row.mean_length:>6.1f}{source}"
        )
    return "\n".join(lines)


def fig_accuracy_vs_retention(table: pd.DataFrame) -> Figure:
    """Accuracy (with its CI) and mean generated length vs. mean kept visual fraction, one
    numbered point per method (and source), and a side table naming each number.
    ``table`` is :func:`load_comparisons`'s."""
    if table.empty:
        raise FigureInputError("no comparison rows to draw")
    table = table.reset_index(drop=True)
    if "source" not in table:
        table = table.assign(source="")
    sources = list(dict.fromkeys(table["source"]))
    palette = colormaps["tab10"](np.arange(len(sources)) % 10)
    color_of = dict(zip(sources, palette, strict=True))
    kept = table["mean_kept_fraction"].to_numpy(dtype=np.float64)
    log_x = bool((kept > 0).all() and kept.max() / kept.min() >= 10)
    numbers = [str(i) for i in range(1, len(table) + 1)]
    text = _table_text(table, len(sources) > 1)
    figure = Figure(figsize=(16.0, 5.0), layout="constrained")
    grid = figure.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.95])
    panels = (("accuracy", "Accuracy"), ("mean_length", "Mean generated length (tokens)"))
    for p, (column, label) in enumerate(panels):
        ax = figure.add_subplot(grid[0, p])
        y = table[column].to_numpy(dtype=np.float64)
        for source in sources:
            mine = (table["source"] == source).to_numpy()
            if column == "accuracy":
                err = np.abs(np.stack([y[mine] - table["accuracy_low"][mine], table["accuracy_high"][mine] - y[mine]]))
                ax.errorbar(
                    kept[mine],
                    y[mine],
                    yerr=np.nan_to_num(err),
                    fmt="o",
                    color=color_of[source],
                    capsize=3,
                    markersize=5,
                    label=source or None,
                )
            else:
                ax.plot(kept[mine], y[mine], "o", color=color_of[source], markersize=5, label=source or None)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlim(*_limits(kept, log_x, 0.08, 0.12))
        bounds = np.concatenate([y, table["accuracy_low"], table["accuracy_high"]]) if column == "accuracy" else y
        ax.set_ylim(*_limits(np.asarray(bounds, dtype=np.float64), False, 0.12, 0.12))
        fx, fy = _fractions(ax, kept, y, log_x)
        bars: tuple[np.ndarray, np.ndarray] | None = None
        if column == "accuracy":
            low, high = (
                _fractions(ax, kept, table[c].to_numpy(dtype=np.float64), log_x)[1]
                for c in ("accuracy_low", "accuracy_high")
            )
            bars = (low, high)
        widths = np.array([LABEL_CHAR * len(n) + 0.012 for n in numbers])
        lx, ly = spread_labels(fx, fy, widths, bars=bars)
        beside = fx + 0.024 + widths / 2  # where a label with room sits: just right of its point
        leader = dict(arrowstyle="-", color="0.55", linewidth=0.6, shrinkA=4, shrinkB=3)
        for xi, yi, tx, ty, x0, y0, number, source in zip(
            kept, y, lx, ly, beside, fy, numbers, table["source"], strict=True
        ):
            moved = abs(ty - y0) > 1e-6 or abs(tx - x0) > 1e-6  # away from its point: a leader line says whose
            ax.annotate(
                number,
                (xi, yi),
                xytext=(tx, ty),
                textcoords="axes fraction",
                ha="center",
                va="center",
                fontsize=8,
                color=color_of[source],
                fontweight="bold",
                arrowprops=leader if moved else None,
            )
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.set_xlabel("Mean kept visual tokens (% of N_v" + (", log scale)" if log_x else ")"))
        ax.set_ylabel(label)
        if column == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if len(sources) > 1 and p == 0:
            ax.legend(title="Comparison", loc="lower right")
    side = figure.add_subplot(grid[0, 2])
    side.axis("off")
    side.text(0.0, 1.0, text, family="monospace", fontsize=8, va="top", ha="left", transform=side.transAxes)
    side.set_title("Points by number (accuracy CI in %)", fontsize=10, loc="left")
    figure.suptitle(
        "Accuracy and trace length vs. visual-token retention, per method (error bars: each table's accuracy CI)"
    )
    return figure
