"""Visual mass vs. active-token count, all steps pooled, one series per δ, with Pearson r.

The r in the legend is read from ``RUN/analysis/correlations.csv`` (with its interval) when
``vpstudy analyze`` wrote it for the run as it is now; otherwise it is computed from the steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..rules import active_column
from ..runs import Run
from ..stats import check_delta, check_layer, check_run, pearson, recorded_deltas
from .common import AnalysisTable, analysis_table, note_source

CORRELATION_COLUMNS = ("layer", "delta", "pearson", "pearson_low", "pearson_high")
Estimate = tuple[float, float, float]  # (r, interval low, interval high)


def correlations_at(
    run: Run, layer: int, labels: Sequence[str], *, from_analysis: bool = True
) -> tuple[dict[str, Estimate], AnalysisTable | None]:
    """Pearson r of mass vs. active count at ``layer`` per δ label, and where it came from.

    Returns:
        ``({δ: (r, low, high)}, read)``: each δ's row of ``RUN/analysis/correlations.csv`` when
        the analysis is current and ``from_analysis`` (``read`` says which file, at which
        coverage), else the r of the pooled steps with NaN bounds (``read`` None when no δ came
        from the file). r is NaN where the count is constant.
    """
    read = analysis_table(run, "correlations", CORRELATION_COLUMNS) if from_analysis else None
    out: dict[str, Estimate] = {}
    if read is not None:
        rows = read.table[read.table["layer"] == layer].set_index("delta")
        for label in labels:
            if label in rows.index:
                row = rows.loc[label]
                out[label] = (float(row["pearson"]), float(row["pearson_low"]), float(row["pearson_high"]))
        read = read if out else None
    missing = [label for label in labels if label not in out]
    if missing:
        table = run.steps[run.steps["layer"] == layer]
        mass = table["mass"].to_numpy(dtype=np.float64)
        for label in missing:
            out[label] = (pearson(mass, table[active_column(label)].to_numpy(dtype=np.float64)), math.nan, math.nan)
    return out, read


def _r_label(label: str, r: float, low: float, high: float) -> str:
    if math.isnan(r):
        return f"δ={label} (r undefined)"
    if math.isnan(low) or math.isnan(high):
        return f"δ={label} (r={r:.2f})"
    return f"δ={label} (r={r:.2f} [{low:.2f}, {high:.2f}])"


def fig_mass_vs_active(
    run: Run, layer: int, *, deltas: Sequence[str] | None = None, from_analysis: bool = True
) -> Figure:
    """Visual mass vs. active-token count at ``layer``, all steps of all samples pooled.

    One series per δ (viridis), each with its least-squares line and Pearson r in the legend
    (:func:`correlations_at`: from ``RUN/analysis/correlations.csv`` with its interval when
    present and ``from_analysis``; "r undefined" when the count is constant). ``k/Nv``
    thresholds use each sample's N_v.
    """
    check_run(run)
    check_layer(run, layer)
    labels = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    correlations, read = correlations_at(run, layer, labels, from_analysis=from_analysis)
    table = run.steps[run.steps["layer"] == layer]
    mass = table["mass"].to_numpy(dtype=np.float64)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, max(len(labels), 1)))
    figure = Figure(figsize=(9.0, 5.0), layout="constrained")
    ax = figure.add_subplot()
    for label, color in zip(labels, colors, strict=False):
        count = table[active_column(label)].to_numpy(dtype=np.float64)
        r, low, high = correlations[label]
        ax.scatter(mass, count, s=7, alpha=0.35, color=color, linewidths=0, label=_r_label(label, r, low, high))
        if not math.isnan(r):
            slope, intercept = np.polyfit(mass, count, 1)
            xs = np.linspace(mass.min(), mass.max(), 2)
            ax.plot(xs, intercept + slope * xs, color=color, linewidth=1.8)
    ax.set_xlabel("Visual attention mass")
    ax.set_ylabel("Active token count")
    ax.set_title(
        f"Mass vs. active tokens, layer {layer} ({table['sample_id'].nunique()} samples, {len(table)} steps pooled)"
    )
    title = "Threshold (Pearson r" + (f", {read.level:.0%} CI over samples)" if read is not None else ")")
    legend = ax.legend(title=title, markerscale=2.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for handle in legend.legend_handles:
        if handle is not None:  # None: an artist matplotlib has no legend handler for
            handle.set_alpha(1.0)
    if read is not None:
        note_source(figure, read, "r and its interval")
    return figure
