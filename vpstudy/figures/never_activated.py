"""Never-activated share of visual tokens per δ and dataset at one layer, with its interval.

The table is ``RUN/analysis/never_activated.csv`` when ``vpstudy analyze`` wrote it for the run
as it is now; otherwise :func:`vpstudy.stats.never_activated_table` computes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..runs import Run
from ..stats import AnalysisSettings, check_delta, check_layer, never_activated_table, recorded_deltas
from .common import analysis_table, note_source

NEVER_COLUMNS = (
    "dataset",
    "layer",
    "delta",
    "n_samples",
    "never_activated",
    "never_activated_low",
    "never_activated_high",
)


def fig_never_activated(
    run: Run,
    layer: int,
    *,
    deltas: Sequence[str] | None = None,
    settings: AnalysisSettings | None = None,
    from_analysis: bool = True,
) -> Figure:
    """Never-activated share of visual tokens per δ (x) and dataset (bars), at ``layer``, with
    the bootstrap CI over samples of :func:`vpstudy.stats.never_activated_table`.

    Args:
        run: an opened run.
        layer: recorded text layer.
        deltas: δ labels to show (default: every recorded one).
        settings: resampling of the table when it is computed here (default
            :class:`~vpstudy.stats.AnalysisSettings`, a 95% interval).
        from_analysis: read ``RUN/analysis/never_activated.csv`` when it is current (its
            interval level is the analysis'); False always computes.
    """
    check_layer(run, layer)
    labels = [check_delta(run, d) for d in (deltas if deltas is not None else recorded_deltas(run))]
    read = analysis_table(run, "never_activated", NEVER_COLUMNS) if from_analysis else None
    if read is not None and set(labels) <= set(read.table.loc[read.table["layer"] == layer, "delta"]):
        table, level = read.table, read.level
    else:
        read = None
        settings = settings or AnalysisSettings()
        table, level = never_activated_table(run, settings, deltas=labels), settings.level
    table = table[(table["layer"] == layer) & table["delta"].isin(labels)]
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
        ax.bar(
            x,
            mean,
            width,
            yerr=np.nan_to_num(err),
            capsize=3,
            color=color,
            label=f"{dataset or 'run'} (n={int(rows['n_samples'].iloc[0])})",
        )
        tops = np.fmax(mean, rows["never_activated_high"].to_numpy(dtype=np.float64))
        for xi, top, value in zip(x, np.nan_to_num(tops), mean, strict=True):
            ax.text(xi, top + 0.01, f"{value:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(np.arange(len(labels)), [f"δ={d}" for d in labels])
    ax.set_xlabel("Activity threshold δ (k/Nv: k over the sample's visual-token count)")
    ax.set_ylabel("Never-activated share of visual tokens")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.1)  # room for the value labels
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"Visual tokens never above δ over the whole trace, layer {layer} ({level:.0%} CI over samples)")
    ax.legend(title="Dataset")
    if read is not None:
        note_source(figure, read, "shares and intervals")
    return figure
