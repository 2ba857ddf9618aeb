"""Where the relevant visual evidence moves along a trace (DSTP's shift), and whether attention
points where gradient attribution does.

- :func:`fig_relevant_shift`: at the analysis layer, by relative position in the trace, the share
  of a decode step's attention that the top-k set chosen at the prefill still covers (relative to
  the step's own best set of that size), and the Jaccard overlap of the two sets, with 95%
  intervals over samples (:func:`vpstudy.stats.attribution.relevant_shift_curve`).
- :func:`fig_attribution_agreement`: per layer, the Spearman ρ between a step's attention scores
  and the captum attribution of the token it generated, and the top-k Jaccard overlap against the
  overlap of two random sets (:func:`vpstudy.stats.attribution.attribution_agreement_table`).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..runs import Run
from ..stats.attribution import attribution_agreement_table, relevant_shift_curve
from ..stats.tables import AnalysisSettings


def _band(ax, x, table, column: str, label: str, color: str, marker: str) -> None:
    y = table[column].to_numpy(dtype=float)
    low, high = table[f"{column}_low"].to_numpy(dtype=float), table[f"{column}_high"].to_numpy(dtype=float)
    ax.plot(x, y, marker=marker, color=color, label=label)
    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)


def fig_relevant_shift(run: Run, layer: int, *, bins: int = 5) -> Figure:
    """The prefill set's coverage and overlap along the trace at ``layer``."""
    settings = AnalysisSettings(n_boot=500)
    curve = relevant_shift_curve(run, layer, settings, bins=bins)
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.add_subplot()
    x = (curve["position_from"] + curve["position_to"]).to_numpy() / 2
    _band(
        ax,
        x,
        curve,
        "coverage",
        "coverage: prefill set's share of the step's attention / step's own top-k",
        "tab:blue",
        "o",
    )
    _band(ax, x, curve, "jaccard", "Jaccard(prefill top-k, step top-k)", "tab:orange", "s")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Position in the trace (decode steps, 0 = first, 1 = last)")
    ax.set_ylabel("Share / overlap (95% CI over samples)")
    k = f"top {100 * settings.top_k_fraction:.0f}%"
    ax.set_title(f"How far the relevant visual set moves from the prefill's ({k}, layer {layer})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return figure


def fig_attribution_agreement(run: Run, layer: int) -> Figure:
    """Spearman ρ and top-k overlap of attention with attribution, per layer (``layer`` marked)."""
    settings = AnalysisSettings(n_boot=500)
    table = attribution_agreement_table(run, settings)
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.add_subplot()
    x = table["layer"].to_numpy()
    _band(ax, x, table, "spearman", "Spearman ρ (attention scores, attribution)", "tab:purple", "o")
    _band(ax, x, table, "top_k_jaccard", "top-k Jaccard overlap", "tab:green", "s")
    ax.plot(x, table["jaccard_chance"], color="grey", linestyle="--", label="overlap of two random top-k sets")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(layer, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(x)
    ax.set_xlabel("Text layer (dotted: analysis layer)")
    ax.set_ylabel("Agreement (95% CI over samples)")
    n = int(table["samples"].iloc[0]) if len(table) else 0
    ax.set_title(f"Does attention point where the gradient does? ({n} samples, captum)", fontsize=10)
    ax.set_ylim(min(-0.2, float(np.nanmin(table["spearman_low"])) - 0.05), 1.0)
    ax.legend(fontsize=8, loc="upper left")
    return figure
