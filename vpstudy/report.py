"""Plain-language summaries of an analysis and a budget rule: terminal lines and ``report.md``.

Every number comes from ``RUN/analysis/stats.json`` (written by :mod:`vpstudy.analysis`) or the
rule's JSON; nothing is recomputed here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .rules import BudgetRule


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(row: dict[str, Any], name: str, digits: int = 3) -> str:
    """``0.723 [0.702, 0.743]`` from ``name``, ``name_low``, ``name_high`` of a table row."""
    return f"{_num(row.get(name), digits)} [{_num(row.get(f'{name}_low'), digits)}, {_num(row.get(f'{name}_high'), digits)}]"


def _pct(row: dict[str, Any], name: str) -> str:
    def p(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return f"{p(row.get(name))} [{p(row.get(f'{name}_low'))}, {p(row.get(f'{name}_high'))}]"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def headline_lines(result: dict[str, Any]) -> list[str]:
    """The headline of an analysis (``stats.json`` content) as short lines, CIs in brackets."""
    h = result["headline"]
    level = round(100 * result["settings"]["level"])
    lines = [f"{result['samples']} samples, {result['steps']} steps; analysis layer {h['layer']} "
             f"(intervals: {level}% bootstrap over samples)"]  # fmt: skip
    for row in h["correlations"]:
        lines.append(f"mass vs active count at δ={row['delta']}: Pearson r {_ci(row, 'pearson')} (p {_p(row['pearson_p'])}), "
                     f"Spearman ρ {_ci(row, 'spearman')} (p {_p(row['spearman_p'])})")  # fmt: skip
    for row in h["never_activated"]:
        lines.append(f"never activated at δ={row['delta']} ({row['dataset']}): {_pct(row, 'never_activated')} of visual tokens")
    for row in h["step_dependence"]:
        lines.append(f"top-{100 * row['top_k_fraction']:.0f}% set Jaccard: consecutive steps {_ci(row, 'jaccard_consecutive')}, "
                     f"against step 0 {_ci(row, 'jaccard_vs_step0')}")  # fmt: skip
    for row in h.get("mass_contrast", []):
        lines.append(f"mass on image-reading vs text-only steps: {_num(row['mass_reading'])} vs {_num(row['mass_text'])}, "
                     f"ratio {_ci(row, 'ratio', 2)}, AUC {_ci(row, 'auc')}")  # fmt: skip
    for key, label in (("localization", "at the analysis layer"), ("localization_best", "at its best layer")):
        for row in h.get(key, []):
            lines.append(f"localization {label} ({row['layer']}): {_ci(row, 'localization')} of {row['steps']} steps "
                         f"vs chance {_num(row['chance'])}")  # fmt: skip
    return lines


def findings(result: dict[str, Any], rule: BudgetRule | None = None) -> list[str]:
    """Plain sentences read off the headline: what the intervals do and do not support."""
    h = result["headline"]
    out = []
    corr = [r for r in h["correlations"] if r["pearson"] is not None]
    positive = [r["delta"] for r in corr if (r["pearson_low"] or 0) > 0 and (r["pearson_p"] or 1) < 0.05]
    other = [r["delta"] for r in h["correlations"] if r["delta"] not in positive]
    if corr:
        best = max(corr, key=lambda r: r["pearson"])
        out.append(
            f"Steps with more visual mass use more visual tokens at δ ∈ {{{', '.join(positive) or 'none'}}} (Pearson r's "
            f"interval above 0, permutation p < 0.05)"
            + (f"; not shown at δ ∈ {{{', '.join(other)}}}" if other else "")
            + f". The strongest is r = {_ci(best, 'pearson', 2)} at δ={best['delta']}; the paper reports 0.82–0.95 on "
            "Qwen3-VL-4B-Thinking."
        )  # fmt: skip
    never = h["never_activated"]
    some = [r for r in never if (r["never_activated_low"] or 0) > 0]
    none = [r["delta"] for r in never if r["never_activated_high"] == 0]
    if some:
        out.append("Some visual tokens are never activated over a whole trace: "
                   + "; ".join(f"{_pct(r, 'never_activated')} at δ={r['delta']}" for r in some)
                   + (f". At δ ∈ {{{', '.join(none)}}} every token is active at some step." if none else "."))  # fmt: skip
    for r in h["step_dependence"]:
        out.append(f"The top-{100 * r['top_k_fraction']:.0f}% visual set changes from step to step: it overlaps the previous "
                   f"step's by Jaccard {_ci(r, 'jaccard_consecutive', 2)} and step 0's by {_ci(r, 'jaccard_vs_step0', 2)}, "
                   f"where two random sets of that size overlap by {_num(r.get('jaccard_chance'), 2)}.")  # fmt: skip
    for r in h.get("mass_contrast", []):
        more = (r["auc_low"] or 0) > 0.5
        out.append(f"Image-reading steps carry {'more' if more else 'no clearly different'} visual mass than text-only "
                   f"steps (ratio {_ci(r, 'ratio', 2)}, AUC {_ci(r, 'auc', 2)}), but text-only steps still carry a mean "
                   f"mass of {_num(r['mass_text'], 2)}: in large VLMs text steps carry almost none.")  # fmt: skip
    for key in ("localization", "localization_best"):
        for r in h.get(key, []):
            out.append(f"At layer {r['layer']} the most-attended visual token lies in the region the predicted token refers "
                       f"to on {_ci(r, 'localization', 2)} of the steps whose token refers to one (chance {_num(r['chance'], 3)}).")  # fmt: skip
    if rule is not None and rule.fit and rule.fit.get("heldout"):
        fitted = rule.fit["heldout"]
        papers = {k: v for k, v in rule.fit["heldout_paper"].items() if v}
        text = (f"On held-out samples the fitted rule predicts each step's active count with R² {_num(fitted['r2'], 2)} "
                f"(MAE {_num(fitted['mae_tokens'], 1)} tokens)")  # fmt: skip
        if papers:
            text += "; the paper's rules, which were set as budgets rather than fitted, give " + ", ".join(
                f"R² {_num(v['r2'], 2)} ({k})" for k, v in papers.items())
        out.append(text + ".")
    return out


def rule_lines(rule: BudgetRule) -> list[str]:
    """A budget rule and its held-out fit statistics as short lines."""
    lines = [f"{rule.name}: ratio = clamp({rule.intercept:.4f} + {rule.slope:.4f} · {rule.signal}, "
             f"{rule.b_min:.4f}, {rule.b_max:.4f}); K = {rule.rounding}(ratio · N_v), at least 1"]  # fmt: skip
    fit = rule.fit or {}
    if fit:
        lines.append(f"fitted on {fit['train_samples']} samples ({fit['train_steps']} steps) of {fit['run']}, layer "
                     f"{fit['layer']}, δ={fit['delta']}; training R² of the ratio {_num(fit['train_r2_ratio'])}")  # fmt: skip
        for name, stats in [(rule.name, fit["heldout"]), *fit["heldout_paper"].items()]:
            if stats:
                lines.append(f"  held-out ({fit['heldout_samples']} samples) {name}: predicted K vs N_act r "
                             f"{_num(stats['pearson'])}, R² {_num(stats['r2'])}, MAE {_num(stats['mae_tokens'], 1)} tokens, "
                             f"keeps {100 * stats['mean_keep_ratio']:.1f}% vs {100 * stats['mean_active_ratio']:.1f}% active, "
                             f"K ≥ N_act on {100 * stats['covered']:.0f}% of steps")  # fmt: skip
    return lines


def pruning_findings(table: pd.DataFrame) -> list[str]:
    """Sentences on the comparison table (``vpstudy evaluate --method all``), read off its rows."""
    rows = {r["method"]: r for r in table.to_dict(orient="records")}
    dense = rows.get("dense")
    out: list[str] = []

    def delta(r: dict[str, Any]) -> str:
        return f"{100 * r['delta_vs_dense']:+.1f} points [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]"

    def acc(r: dict[str, Any]) -> str:
        return f"{100 * r['accuracy']:.1f}% [{100 * r['accuracy_low']:.1f}, {100 * r['accuracy_high']:.1f}]"

    if dense is None:
        return out
    pulse = rows.get("visionpulse-5")
    if pulse is not None and pulse.get("delta_vs_dense") is not None:
        within = pulse["delta_low"] >= -0.02
        out.append(
            f"VisionPulse with the paper's ≤5% rule (τ = 0.1, r ∈ [1%, 5%]) keeps {100 * pulse['mean_kept_fraction']:.1f}% "
            f"of the visual tokens per step and scores {acc(pulse)} against dense {acc(dense)}: {delta(pulse)} on the "
            "same samples. " + ("Its interval stays within 2 points of dense." if within else
            "That is not within 2 points of dense: the paper's claim (98.2% of full accuracy at ≤5%) does not hold "
            "on this organism.")
        )  # fmt: skip
    static = [rows[k] for k in rows if k.split("-")[0] in ("static_topk", "fastv", "pyramiddrop")]
    if static:
        out.append("Static methods at about the same budget: " + "; ".join(
            f"{r['method']} keeps {100 * r['mean_kept_fraction']:.1f}%, {delta(r)}" for r in static) + ".")
    step, fixed = rows.get("topk-5"), rows.get("static_topk-5")
    if step is not None and fixed is not None:
        if step["accuracy_low"] > fixed["accuracy_high"]:
            verdict = "the per-step choice is better (the intervals do not overlap): the same budget, spent on a set that follows the trace"  # fmt: skip
        else:
            verdict = "the intervals overlap, so this sample does not separate them"
        out.append(f"Top 5% chosen again at every step: {acc(step)}; chosen once at the prefill: {acc(fixed)}; {verdict}.")
    fitted = rows.get("visionpulse-fitted")
    if fitted is not None:
        out.append(f"The fitted rule keeps {100 * fitted['mean_kept_fraction']:.1f}% per step and scores {acc(fitted)} "
                   f"({delta(fitted)}); the paper's rules keep " + ", ".join(
                       f"{100 * rows[k]['mean_kept_fraction']:.1f}% ({k}: {acc(rows[k])})"
                       for k in ("visionpulse-5", "visionpulse-10") if k in rows) + ".")  # fmt: skip
    for label, r in rows.items():
        if label.startswith("visionpulse-5-anchor"):
            layer = label.removeprefix("visionpulse-5-anchor")
            control = rows.get(f"static_topk-5-anchor{layer}")
            text = (f"Anchored at layer {layer} (where attention localizes best in the analysis) instead of the default "
                    f"depth, VisionPulse ≤5% keeps {100 * r['mean_kept_fraction']:.1f}% and scores {acc(r)} ({delta(r)})")
            if control is not None:
                text += f"; the static top-5% chosen at the prefill at that layer scores {acc(control)} ({delta(control)})"
            out.append(text + ".")
    rand = rows.get("random-like-visionpulse-5")
    if rand is not None and pulse is not None:
        out.append(f"A random set of the same mean size as VisionPulse's ({100 * rand['mean_kept_fraction']:.1f}%) "
                   f"scores {acc(rand)} ({delta(rand)}).")  # fmt: skip
    return out


def render_report(*, title: str, result: dict[str, Any], rule: BudgetRule | None, figures: Sequence[Path],
                  skipped: Sequence[str], out: Path, commands: Sequence[str], summary: str,
                  comparison: pd.DataFrame | None = None) -> str:  # fmt: skip
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
    """
    h = result["headline"]
    level = round(100 * result["settings"]["level"])
    parts = [f"# {title}", "", summary, "",
             f"Model `{(result.get('model') or {}).get('path')}`, dataset `{result.get('dataset')}`: "
             f"{result['samples']} samples, {result['steps']} decoding steps, layers {result['layers']}. "
             f"Findings are at the analysis layer {h['layer']} (VisionPulse's relative anchor depth, 17 of 36) "
             f"unless said otherwise. Brackets are {level}% bootstrap intervals that resample samples, "
             f"not steps; p-values are permutation p-values that keep each trace's dependence "
             f"({result['settings']['n_perm']} permutations, so the smallest possible is "
             f"{1 / (result['settings']['n_perm'] + 1):.2g}).", "", "## What the numbers say", ""]  # fmt: skip
    parts += [f"- {line}" for line in findings(result, rule)]
    parts += ["", "## All headline numbers", ""] + [f"- {line}" for line in headline_lines(result)[1:]]
    if rule is not None:
        parts += ["", "## Fitted budget rule", ""] + [f"- {line.strip()}" for line in rule_lines(rule)]
    if comparison is not None and len(comparison):
        from .evaluation import comparison_markdown

        parts += ["", "## Pruning on the same samples", "",
                  "Every method decodes the same samples greedily; Δ is the paired accuracy difference to dense "
                  "with a 95% bootstrap interval over samples; kept is the share of visual tokens visible at the "
                  "deepest layer per decode step.", ""]  # fmt: skip
        parts += [f"- {line}" for line in pruning_findings(comparison)] + ["", comparison_markdown(comparison)]
    pngs = [f for f in figures if f.suffix == ".png"]
    if pngs:
        parts += ["", "## Figures", ""]
        for f in pngs:
            rel = os.path.relpath(f, out.parent)
            parts += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({rel})", ""]
    if skipped:
        parts += ["", "## Not produced", ""] + [f"- {s}" for s in skipped]
    parts += ["", "## Reproduce", "", "```bash", *commands, "```", "",
              "Every number above is in `analysis/stats.json` and the CSV tables beside it. The correlations and "
              "mean masses are recomputable from `steps.parquet` with pandas alone, e.g. "
              f"`df = pd.read_parquet('RUN/steps.parquet'); d = df[df.layer == {h['layer']}]; d['mass'].corr(d['active@1/Nv'])`; "
              "never-activated shares come from the per-sample `max_scores` arrays; mass contrast and localization "
              "also need the dataset's trace annotations.", ""]  # fmt: skip
    return "\n".join(parts)
