"""Plain-language summaries of an analysis and a budget rule: terminal lines and ``report.md``.

Every number comes from ``RUN/analysis/stats.json`` (written by :mod:`vpstudy.analysis`) or the
rule's JSON; nothing is recomputed here. What is said about each statistic is its entry's
``lines`` and ``findings`` in :mod:`vpstudy.stats.registry`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .rules import BudgetRule
from .stats.registry import statistics
from .stats.text import fmt_num


def headline_lines(result: dict[str, Any]) -> list[str]:
    """The headline of an analysis (``stats.json`` content) as short lines, CIs in brackets: a
    first line on what it rests on, then each statistic's lines (:mod:`vpstudy.stats.registry`)."""
    h = result["headline"]
    level = round(100 * result["settings"]["level"])
    lines = [
        f"{result['samples']} samples, {result['steps']} steps; analysis layer {h['layer']} "
        f"(intervals: {level}% bootstrap over samples)"
    ]
    for statistic in statistics():
        if statistic.lines is not None:
            lines += statistic.lines(h)
    return lines


def findings(result: dict[str, Any], rule: BudgetRule | None = None) -> list[str]:
    """Plain sentences read off the headline: what the intervals do and do not support (each
    statistic's findings, :mod:`vpstudy.stats.registry`), then the fitted rule's held-out fit."""
    h = result["headline"]
    out = []
    for statistic in statistics():
        if statistic.findings is not None:
            out += statistic.findings(h)
    if rule is not None and rule.fit and rule.fit.get("heldout"):
        fitted = rule.fit["heldout"]
        papers = {k: v for k, v in rule.fit["heldout_paper"].items() if v}
        text = (
            "On held-out samples the fitted rule predicts each step's active count with "
            f"R² {fmt_num(fitted['r2'], 2)} (MAE {fmt_num(fitted['mae_tokens'], 1)} tokens)"
        )
        if papers:
            text += "; the paper's rules, which were set as budgets rather than fitted, give " + ", ".join(
                f"R² {fmt_num(v['r2'], 2)} ({k})" for k, v in papers.items()
            )
        out.append(text + ".")
    return out


def rule_lines(rule: BudgetRule) -> list[str]:
    """A budget rule and its held-out fit statistics as short lines."""
    lines = [
        f"{rule.name}: ratio = clamp({rule.intercept:.4f} + {rule.slope:.4f} · {rule.signal}, "
        f"{rule.b_min:.4f}, {rule.b_max:.4f}); K = {rule.rounding}(ratio · N_v), at least 1"
    ]
    fit = rule.fit or {}
    if fit:
        lines.append(
            f"fitted on {fit['train_samples']} samples ({fit['train_steps']} steps) of {fit['run']}, layer "
            f"{fit['layer']}, δ={fit['delta']}; training R² of the ratio {fmt_num(fit['train_r2_ratio'])}"
        )
        for name, stats in [(rule.name, fit["heldout"]), *fit["heldout_paper"].items()]:
            if stats:
                lines.append(
                    f"  held-out ({fit['heldout_samples']} samples) {name}: predicted K vs N_act r "
                    f"{fmt_num(stats['pearson'])}, R² {fmt_num(stats['r2'])}, "
                    f"MAE {fmt_num(stats['mae_tokens'], 1)} tokens, "
                    f"keeps {100 * stats['mean_keep_ratio']:.1f}% vs {100 * stats['mean_active_ratio']:.1f}% active, "
                    f"K ≥ N_act on {100 * stats['covered']:.0f}% of steps"
                )
    return lines


def _delta(r: dict[str, Any]) -> str:
    """A row's paired accuracy difference to dense, in points, with its interval."""
    return f"{100 * r['delta_vs_dense']:+.1f} points [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]"


def _acc(r: dict[str, Any]) -> str:
    """A row's accuracy, in percent, with its interval."""
    return f"{100 * r['accuracy']:.1f}% [{100 * r['accuracy_low']:.1f}, {100 * r['accuracy_high']:.1f}]"


def _paper_rule_findings(rows: dict[str, dict[str, Any]], dense: dict[str, Any]) -> list[str]:
    """VisionPulse with the paper's ≤5% rule against dense (the paper's headline claim)."""
    pulse = rows.get("visionpulse-5")
    if pulse is None or pulse.get("delta_vs_dense") is None:
        return []
    within = pulse["delta_low"] >= -0.02
    return [
        f"VisionPulse with the paper's ≤5% rule (τ = 0.1, r ∈ [1%, 5%]) keeps "
        f"{100 * pulse['mean_kept_fraction']:.1f}% "
        f"of the visual tokens per step and scores {_acc(pulse)} against dense {_acc(dense)}: {_delta(pulse)} on the "
        "same samples. "
        + (
            "Its interval stays within 2 points of dense."
            if within
            else "That is not within 2 points of dense: the paper's claim (98.2% of full accuracy at ≤5%) "
            "does not hold on this organism."
        )
    ]


def _group_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The methods that choose once (at the prefill, or after the vision encoder) at a 5% budget."""
    out = []
    for name, words in (
        ("prefill", "Methods that choose once at the prefill"),
        ("encoder", "Methods that choose after the vision encoder"),
    ):
        chosen = [r for k, r in rows.items() if r.get("group") == name and k.endswith("-5")]
        if chosen:
            out.append(
                f"{words}, at a 5% budget: "
                + "; ".join(f"{r['method']} keeps {100 * r['mean_kept_fraction']:.1f}%, {_delta(r)}" for r in chosen)
                + "."
            )
    return out


def _reselection_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """DSTP against its static set, the attribution oracle, and top-5% per step against once."""
    out = []
    dstp, base = rows.get("dstp-static_topk-5"), rows.get("static_topk-5")
    if dstp is not None and base is not None:
        changes = dstp.get("set_changes_per_step")
        reselects = (
            f"re-selects on {100 * changes:.0f}% of decode steps"
            if changes is not None and not pd.isna(changes)
            else "re-selects"
        )
        out.append(
            f"DSTP on the static top-5% {reselects} and scores {_acc(dstp)} ({_delta(dstp)}), against "
            f"{_acc(base)} for the static set alone ({_delta(base)})."
        )
    oracle = rows.get("attribution_oracle-5")
    if oracle is not None:
        out.append(
            f"The attribution oracle (top 5% by captum gradient × feature of the dense model's next token, a "
            f"reference no pruner can compute) scores {_acc(oracle)} ({_delta(oracle)})."
        )
    step, fixed = rows.get("topk-5"), rows.get("static_topk-5")
    if step is not None and fixed is not None:
        if step["accuracy_low"] > fixed["accuracy_high"]:
            verdict = (
                "the per-step choice is better (the intervals do not overlap): "
                "the same budget, spent on a set that follows the trace"
            )
        else:
            verdict = "the intervals overlap, so this sample does not separate them"
        out.append(
            f"Top 5% chosen again at every step: {_acc(step)}; chosen once at the prefill: {_acc(fixed)}; {verdict}."
        )
    return out


def _fitted_rule_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """VisionPulse with the fitted rule against the paper's rules."""
    fitted = rows.get("visionpulse-fitted")
    if fitted is None:
        return []
    return [
        f"The fitted rule keeps {100 * fitted['mean_kept_fraction']:.1f}% per step and scores {_acc(fitted)} "
        f"({_delta(fitted)}); the paper's rules keep "
        + ", ".join(
            f"{100 * rows[k]['mean_kept_fraction']:.1f}% ({k}: {_acc(rows[k])})"
            for k in ("visionpulse-5", "visionpulse-10")
            if k in rows
        )
        + "."
    ]


def _anchor_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """VisionPulse ≤5% anchored at the paper's relative depth, with its static control."""
    out = []
    for label, r in rows.items():
        if label.startswith("visionpulse-5-anchor"):
            layer = label.removeprefix("visionpulse-5-anchor")
            control = rows.get(f"static_topk-5-anchor{layer}")
            text = (
                f"Anchored at layer {layer} (VisionPulse's relative depth, 17 of 36) instead of the layer chosen "
                f"from the data, VisionPulse ≤5% keeps {100 * r['mean_kept_fraction']:.1f}% and scores {_acc(r)} "
                f"({_delta(r)})"
            )
            if control is not None:
                text += (
                    f"; the static top-5% chosen at the prefill at that layer scores {_acc(control)} "
                    f"({_delta(control)})"
                )
            out.append(text + ".")
    return out


def _random_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A random set of VisionPulse's mean size (only beside VisionPulse ≤5%)."""
    rand = rows.get("random-like-visionpulse-5")
    if rand is None or rows.get("visionpulse-5") is None:
        return []
    return [
        f"A random set of the same mean size as VisionPulse's ({100 * rand['mean_kept_fraction']:.1f}%) "
        f"scores {_acc(rand)} ({_delta(rand)})."
    ]


def pruning_findings(table: pd.DataFrame) -> list[str]:
    """Sentences on the comparison table (``vpstudy evaluate --method all``), read off its rows."""
    rows = {r["method"]: r for r in table.to_dict(orient="records")}
    dense = rows.get("dense")
    if dense is None:
        return []
    return [
        *_paper_rule_findings(rows, dense),
        *_group_findings(rows),
        *_reselection_findings(rows),
        *_fitted_rule_findings(rows),
        *_anchor_findings(rows),
        *_random_findings(rows),
    ]


def render_report(
    *,
    title: str,
    result: dict[str, Any],
    rule: BudgetRule | None,
    figures: Sequence[Path],
    skipped: Sequence[str],
    out: Path,
    commands: Sequence[str],
    summary: str,
    comparison: pd.DataFrame | None = None,
    ablation: str | None = None,
) -> str:
    """``report.md``: what ran, the findings with their intervals, the rule, the figures.

    Args:
        title: heading.
        result: ``stats.json`` content.
        rule: the fitted rule (or None).
        figures: written figure files; the PNGs are embedded, paths made relative to ``out``'s folder.
        skipped: messages of figures or statistics not produced.
        out: where the report will be written (for relative links).
        commands: the commands that reproduce the report.
        summary: the recording's summary line.
        comparison: the pruning comparison table on the same samples (``vpstudy evaluate --method all``),
            rendered with its findings; None or empty leaves the section out.
        ablation: the budget ablation table, already rendered as markdown (``vpstudy ablation``); None
            or empty leaves the section out.
    """
    h = result["headline"]
    level = round(100 * result["settings"]["level"])
    parts = [
        f"# {title}",
        "",
        summary,
        "",
        f"Model `{(result.get('model') or {}).get('path')}`, dataset `{result.get('dataset')}`: "
        f"{result['samples']} samples, {result['steps']} decoding steps, layers {result['layers']}. "
        f"Findings are at the analysis layer {h['layer']} (VisionPulse's relative anchor depth, 17 of 36) "
        f"unless said otherwise. Brackets are {level}% bootstrap intervals that resample samples, "
        f"not steps; p-values are permutation p-values that keep each trace's dependence "
        f"({result['settings']['n_perm']} permutations, so the smallest possible is "
        f"{1 / (result['settings']['n_perm'] + 1):.2g}).",
        "",
        "## What the numbers say",
        "",
    ]
    parts += [f"- {line}" for line in findings(result, rule)]
    parts += ["", "## All headline numbers", ""] + [f"- {line}" for line in headline_lines(result)[1:]]
    if rule is not None:
        parts += ["", "## Fitted budget rule", ""] + [f"- {line.strip()}" for line in rule_lines(rule)]
    if comparison is not None and len(comparison):
        from .evaluation import comparison_markdown

        parts += [
            "",
            "## Pruning on the same samples",
            "",
            "Every method decodes the same samples greedily; Δ is the paired accuracy difference to dense "
            "with a 95% bootstrap interval over samples; kept is the share of visual tokens visible at the "
            "deepest layer per decode step.",
            "",
        ]
        parts += [f"- {line}" for line in pruning_findings(comparison)] + ["", comparison_markdown(comparison)]
    if ablation:
        parts += [
            "",
            "## The paper's budget ablation",
            "",
            "Every step-wise row and the static control act at the fitted rule's anchor layer; the fixed, "
            "random, static and FastV rows keep the fitted (dynamic) row's mean budget (`vpstudy ablation`).",
            "",
            ablation.strip(),
        ]
    pngs = [f for f in figures if f.suffix == ".png"]
    if pngs:
        parts += ["", "## Figures", ""]
        for f in pngs:
            rel = os.path.relpath(f, out.parent)
            parts += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({rel})", ""]
    if skipped:
        parts += ["", "## Not produced", ""] + [f"- {s}" for s in skipped]
    parts += [
        "",
        "## Reproduce",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "Every number above is in `analysis/stats.json` and the CSV tables beside it. The correlations and "
        "mean masses are recomputable from `steps.parquet` with pandas alone, e.g. "
        f"`df = pd.read_parquet('RUN/steps.parquet'); d = df[df.layer == {h['layer']}]; "
        "d['mass'].corr(d['active@1/Nv'])`; "
        "never-activated shares come from the per-sample `max_scores` arrays; mass contrast and localization "
        "also need the dataset's trace annotations.",
        "",
    ]
    return "\n".join(parts)
