"""Budget and retention dynamics along one dense trace: the share of visual tokens fixed top-K,
top-p and budget rules would keep at each step (computed on the recorded trace; nothing is
pruned)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..rules import BudgetRule, BudgetRuleError
from ..runs import Run
from ..selection import top_p_mask
from ..stats import AnalysisError, check_layer, layer_position
from ..stats.tables import scores_note
from .common import sample_row, sample_steps

DEFAULT_TOP_K = 0.05  # fixed top-K keep ratio of the budget dynamics figure
DEFAULT_TOP_P = 0.9  # top-p share of the step's visual mass
RULE_MARKERS = ("o", "s", "^", "v", "D", "P")  # one per budget rule, so overlapping lines stay apart


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


def top_p_note(run: Run, layer: int) -> str | None:
    """Why :func:`fig_budget_dynamics` leaves top-p out at ``layer`` (it needs p̄ there, which the
    run's store policy did not keep), in one line; None when it draws it."""
    return scores_note(run, "the top-p curve of budget_dynamics", [layer])


def fixed_rule(ratio: float) -> BudgetRule:
    """Fixed top-K as a constant rule: K = clamp(floor(ratio · N_v), 1, N_v) at every step."""
    return BudgetRule(
        signal="mass", b_min=ratio, b_max=ratio, slope=0.0, intercept=ratio, name=f"fixed top-K ({ratio:.0%})"
    )


def check_rule(run: Run, rule: BudgetRule, layer: int) -> None:
    """Refuse a rule whose signal was not recorded, or fitted on another model or layer.

    Raises:
        AnalysisError: the run did not record the rule's signal.
        BudgetRuleError: the rule was fitted on another model or layer.
    """
    if rule.signal not in run.steps.columns:
        raise AnalysisError(
            f"{run.path}: budget rule {rule.name or rule.signal!r} needs signal "
            f"{rule.signal!r}, which this run did not record"
        )
    rule.check(config_hash=run.manifest.get("model_config_hash"), layer=layer)


def budget_rules(run: Run, layer: int, fitted: BudgetRule | None, notes: list[str]) -> list[BudgetRule]:
    """The paper's rule and ``fitted``, each if it applies to ``run`` at ``layer`` (else a note)."""
    rules = []
    for rule in (BudgetRule.paper(0.1, 0.01, 0.05), fitted):
        if rule is None:
            continue
        try:
            check_rule(run, rule, layer)
        except (AnalysisError, BudgetRuleError) as e:
            notes.append(f"budget_dynamics of {run.path}: rule {rule.name or rule.signal!r} left out ({e})")
            continue
        rules.append(rule)
    return rules


def fig_budget_dynamics(
    run: Run,
    sample_id: str,
    layer: int,
    *,
    rules: Sequence[BudgetRule] | None = None,
    top_k: float = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
) -> Figure:
    """Budget and retention dynamics of one sample at ``layer``, computed on its dense trace.

    Left axis: visual mass per step. Right axis (log): the kept share of N_v each method would
    choose at each step of that dense trace (nothing was pruned): fixed top-K (``top_k`` of N_v)
    as a wide grey band underneath, top-p (:func:`top_p_counts` on ``run.scores``, share
    ``top_p`` of the step's visual mass), and each budget rule applied to its signal column
    (default: the paper's rule ``BudgetRule.paper(0.1, 0.01, 0.05)``), each rule with its own
    marker at every step (later rules drawn smaller, on top), so a rule that keeps exactly
    top-K's count, or another rule's, stays visible. Top-p needs p̄ at ``layer``: where the run's
    store policy did not keep it (:func:`top_p_note`), the figure is drawn without it.

    Raises:
        AnalysisError: a pruned run (not a dense trace), an unrecorded layer or rule signal.
        BudgetRuleError: a fitted rule of another model or layer.
    """
    check_layer(run, layer)
    if run.manifest.get("method"):
        raise AnalysisError(
            f"{run.path}: budget dynamics need a dense trace; this run was pruned ({run.manifest['method']})"
        )
    rules = list(rules) if rules is not None else [BudgetRule.paper(0.1, 0.01, 0.05)]
    for rule in rules:
        check_rule(run, rule, layer)
    table = sample_steps(run, sample_id, layer)
    n_visual = int(sample_row(run, sample_id)["n_visual"])
    with_top_p = top_p_note(run, layer) is None
    scores = run.scores(sample_id)[:, layer_position(run, layer)] if with_top_p else None  # [S, N_v]
    steps = table["step"].to_numpy()
    fixed = fixed_rule(top_k).keep_count(np.zeros(len(steps)), n_visual)

    figure = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(steps, table["mass"], color="black", linewidth=1.6, marker="o", markersize=3, label="visual mass (left)")
    ax.set_xlabel("Generated step t (predicts token t)")
    ax.set_ylabel("Visual attention mass")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = ax.twinx()
    right.step(
        steps,
        fixed / n_visual,
        where="mid",
        color="0.6",
        linewidth=7,
        alpha=0.45,
        solid_capstyle="butt",
        label=f"fixed top-K (K={fixed[0]}, {top_k:g}·N_v floored)",
        zorder=1,
    )
    if scores is not None:
        right.step(
            steps,
            top_p_counts(scores, top_p) / n_visual,
            where="mid",
            color="tab:blue",
            linewidth=1.6,
            label=f"top-p (p={top_p:g} of the step's visual mass)",
            zorder=2,
        )
    colors = colormaps["tab10"]([1, 2, 4, 6, 8, 9])  # orange, green, purple, pink, olive, cyan: not top-p's blue
    for i, rule in enumerate(rules):
        counts = rule.keep_count(table[rule.signal].to_numpy(), n_visual)
        right.plot(
            steps,
            counts / n_visual,
            drawstyle="steps-mid",
            color=colors[i % len(colors)],
            linewidth=1.6,
            linestyle=("-", "--", "-.", ":")[i % 4],
            marker=RULE_MARKERS[i % len(RULE_MARKERS)],
            markersize=max(7.5 - 2.0 * i, 3.5),
            markeredgecolor="white",
            markeredgewidth=0.6,
            zorder=3 + i,
            label=f"mass budget: {rule.name or rule.signal}",
        )
    right.set_yscale("log")
    right.set_ylim(0.5 / n_visual, 1.5)
    right.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    right.set_ylabel(f"Kept visual tokens (% of N_v = {n_visual}, log scale)")
    ax.set_zorder(right.get_zorder() + 1)  # the mass curve over the kept shares, on a transparent background
    ax.patch.set_visible(False)
    left_handles, left_labels = ax.get_legend_handles_labels()
    right_handles, right_labels = right.get_legend_handles_labels()
    figure.legend(
        left_handles + right_handles, left_labels + right_labels, loc="outside lower center", ncol=2, fontsize=9
    )
    ax.set_title(
        f"Budget dynamics on the dense trace (kept shares each method would choose; nothing pruned)\n"
        f"sample {sample_id}, layer {layer}"
    )
    return figure
