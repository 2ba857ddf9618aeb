"""Layer-to-layer cosine similarity of p̄ (the paper's procedure: mean over steps, then samples).

The matrix is ``RUN/analysis/layer_similarity.csv`` when ``vpstudy analyze`` wrote it for the
run as it is now; otherwise :func:`vpstudy.stats.layer_similarity` computes it.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..runs import Run
from ..stats import layer_similarity
from .common import AnalysisTable, FigureInputError, analysis_table, note_source


def similarity_matrix(run: Run, *, from_analysis: bool = True) -> tuple[list[int], np.ndarray, AnalysisTable | None]:
    """``(layers, [L, L] cosine matrix, what it was read from or None when computed here)``.

    Raises:
        FigureInputError: ``layer_similarity.csv`` is not a square matrix over the same layers
            in its index and columns.
    """
    read = analysis_table(run, "layer_similarity") if from_analysis else None
    if read is None:
        layers, matrix = layer_similarity(run)
        return list(layers), np.asarray(matrix, dtype=np.float64), None
    layers = [int(x) for x in read.table.index]
    if [str(x) for x in layers] != [str(c) for c in read.table.columns]:
        raise FigureInputError(
            f"{read.path}: columns {list(read.table.columns)} are not the layers of its index "
            f"{layers}; rerun vpstudy analyze"
        )
    return layers, read.table.to_numpy(dtype=np.float64), read


def fig_layer_similarity(run: Run, *, from_analysis: bool = True) -> Figure:
    """Heatmap of the layer-to-layer cosine similarity of p̄ (:func:`similarity_matrix`),
    viridis from min(0.5, matrix min) to 1.0, over the recorded layer indices."""
    layers, matrix, source = similarity_matrix(run, from_analysis=from_analysis)
    figure = Figure(figsize=(max(5.0, 0.35 * len(layers) + 3), max(4.2, 0.35 * len(layers) + 2)), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.5, float(np.nanmin(matrix))), vmax=1.0)
    ticks = np.arange(len(layers))
    step = max(1, len(layers) // 12)
    ax.set_xticks(ticks[::step], [str(x) for x in layers[::step]])
    ax.set_yticks(ticks[::step], [str(x) for x in layers[::step]])
    if len(layers) <= 10:
        for i in range(len(layers)):
            for j in range(len(layers)):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="black" if matrix[i, j] > 0.8 else "white",
                )
    ax.set_xlabel("Text layer")
    ax.set_ylabel("Text layer")
    ax.set_title(f"Layer-to-layer cosine similarity of p̄ ({len(run.samples)} samples)")
    figure.colorbar(image, ax=ax, label="Cosine similarity (mean over steps, then samples)")
    if source is not None:
        note_source(figure, source, "similarities")
    return figure
