"""The project's figures, drawn from saved runs and result files only (no model is ever run).

One function per figure, each returning a :class:`matplotlib.figure.Figure` built without
pyplot (so the interactive backend of a notebook is left alone), one module per family:

- :mod:`.overlays`: :func:`fig_mass_over_steps` (the input image, visual mass per generated
  step, and the activation maps of chosen steps over the image, :func:`activation_overlay`,
  with a colour bar and a legend), :func:`fig_activation_steps` (every step's map) and
  :func:`fig_trace_max` (the running maximum of p̄ per layer: every store policy keeps it);
- :mod:`.scatter`: :func:`fig_mass_vs_active`, visual mass vs. active-token count per δ, with
  Pearson r;
- :mod:`.never_activated`: :func:`fig_never_activated`, the never-activated share per δ and dataset;
- :mod:`.budget`: :func:`fig_budget_dynamics`, the kept ratio fixed top-K, top-p and budget
  rules would choose at each step of one dense trace;
- :mod:`.layers`: :func:`fig_layer_similarity`, layer-to-layer cosine similarity of p̄;
- :mod:`.latency`: :func:`fig_latency`, sparse latency as a share of dense per visual-context
  length, from benchmark JSON files (:func:`vpstudy.bench.results.load_latency_results`);
- :mod:`.accuracy`: :func:`fig_accuracy_vs_retention`, accuracy and generated length vs. kept
  visual fraction per pruning method, from evaluation comparison tables (:func:`load_comparisons`);
- :mod:`.common`: :class:`FigureInputError`, :class:`FigureReport`, :func:`save_figure`, the
  per-sample look-ups and :func:`analysis_table`.

Figures of a statistic (:mod:`vpstudy.stats.registry`) read its table from ``RUN/analysis/``
when ``vpstudy analyze`` wrote it for the run as it is now, and compute it otherwise.
:func:`write_figures` (:mod:`.write`) draws all of them for a list of runs and saves each as PNG
and PDF; an absent input is reported as a skip. Steps, layers and δ: docs/design.md.
"""

from ..bench.results import LATENCY_COLUMNS, LatencyResult, load_latency_results
from .accuracy import COMPARISON_COLUMNS, fig_accuracy_vs_retention, load_comparisons, spread_labels
from .budget import DEFAULT_TOP_K, DEFAULT_TOP_P, fig_budget_dynamics, top_p_counts
from .common import (
    DPI,
    MIN_DEFAULT_STEPS,
    AnalysisTable,
    FigureInputError,
    FigureReport,
    analysis_table,
    default_sample,
    run_image,
    save_figure,
    spatial_grid,
)
from .latency import DEFAULT_BENCH_DIR, fig_latency
from .layers import fig_layer_similarity, similarity_matrix
from .never_activated import fig_never_activated
from .overlays import (
    DEFAULT_LEVELS,
    OVERLAY_ALPHA,
    OVERLAY_CMAP,
    activation_mask,
    activation_overlay,
    fig_activation_steps,
    fig_mass_over_steps,
    fig_trace_max,
    sample_regions,
)
from .scatter import correlations_at, fig_mass_vs_active
from .write import NO_RUN_GIVEN, STATISTIC_FIGURES, write_figures

__all__ = [
    "COMPARISON_COLUMNS",
    "DEFAULT_BENCH_DIR",
    "DEFAULT_LEVELS",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "DPI",
    "LATENCY_COLUMNS",
    "MIN_DEFAULT_STEPS",
    "NO_RUN_GIVEN",
    "OVERLAY_ALPHA",
    "OVERLAY_CMAP",
    "STATISTIC_FIGURES",
    "AnalysisTable",
    "FigureInputError",
    "FigureReport",
    "LatencyResult",
    "activation_mask",
    "activation_overlay",
    "analysis_table",
    "correlations_at",
    "default_sample",
    "fig_accuracy_vs_retention",
    "fig_activation_steps",
    "fig_budget_dynamics",
    "fig_latency",
    "fig_layer_similarity",
    "fig_mass_over_steps",
    "fig_trace_max",
    "fig_mass_vs_active",
    "fig_never_activated",
    "load_comparisons",
    "load_latency_results",
    "run_image",
    "sample_regions",
    "save_figure",
    "similarity_matrix",
    "spatial_grid",
    "spread_labels",
    "top_p_counts",
    "write_figures",
]
