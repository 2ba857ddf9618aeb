"""Statistics of recorded runs (definitions: docs/design.md).

- :mod:`vpstudy.stats.estimators`: the estimators on plain arrays (correlations, AUC, the
  trace bootstrap and permutation test, never-activated ratio, top-k Jaccard, layer cosine);
- :mod:`vpstudy.stats.tables`: the same on an opened run, as tidy tables with intervals;
- :mod:`vpstudy.stats.registry`: every statistic in one list (its table, what it needs, its
  headline, report text and figure), which analyze, the report and the figures iterate;
- :mod:`vpstudy.analysis` writes them to ``RUN/analysis/`` (``vpstudy analyze``).
"""

from .estimators import (
    auc,
    cluster_bootstrap_ci,
    jaccard,
    jaccard_chance,
    layer_cosine,
    mean_ratio,
    never_activated_ratio,
    pearson,
    permutation_pvalue,
    spearman,
    step_dependence,
    top_k_sets,
)
from .registry import STATISTICS, StatContext, Statistic, get_statistic, statistics
from .tables import (
    AnalysisError,
    AnalysisSettings,
    MissingScoresError,
    check_arrays,
    check_delta,
    check_layer,
    check_run,
    correlation_table,
    layer_position,
    layer_similarity,
    localization_table,
    mass_contrast_table,
    never_activated_table,
    recorded_deltas,
    recorded_layers,
    require_scores,
    scores_note,
    step_dependence_curve,
    step_dependence_table,
)

__all__ = [
    "STATISTICS",
    "StatContext",
    "Statistic",
    "get_statistic",
    "statistics",
    "AnalysisError",
    "AnalysisSettings",
    "MissingScoresError",
    "auc",
    "check_arrays",
    "check_delta",
    "check_layer",
    "check_run",
    "cluster_bootstrap_ci",
    "correlation_table",
    "jaccard",
    "jaccard_chance",
    "layer_cosine",
    "layer_position",
    "layer_similarity",
    "localization_table",
    "mass_contrast_table",
    "mean_ratio",
    "never_activated_ratio",
    "never_activated_table",
    "pearson",
    "permutation_pvalue",
    "recorded_deltas",
    "recorded_layers",
    "require_scores",
    "scores_note",
    "spearman",
    "step_dependence",
    "step_dependence_curve",
    "step_dependence_table",
    "top_k_sets",
]
