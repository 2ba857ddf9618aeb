"""``vpstudy ablation``: VisionPulse's budget ablation on a model and dataset.

The question it answers: **at equal mean budget, does a dynamic (per-step) budget beat a fixed
one?** Every row decodes the same samples greedily; every step-wise row and the static control
act at the fitted rule's anchor layer (the rule's ``layer``, e.g. chosen by ``fit-budget --layer
auto``), so the rows differ only in how many tokens a step keeps and which:

| row | what |
| --- | --- |
| ``dense`` | all visual tokens |
| ``visionpulse-5`` / ``visionpulse-10`` | the paper's rules, τ 0.1 r ∈ [1%, 5%] and τ 0.4 r ∈ [5%, 10%] |
| ``visionpulse-fitted`` | the fitted rule (the dynamic budget) |
| ``topk-fitted-mean`` | fixed top-K, K = round(m · N_v), m = the fitted row's mean kept fraction |
| ``random-fitted-mean`` | a random set of expected size m · N_v per step |
| ``static_topk-fitted-mean`` | the top-K chosen once at the prefill (K as the fixed row) |
| ``fastv-fitted-mean`` | FastV keeping m of the tokens from the anchor layer on |

Each row reports the kept fraction per decode step (mean, standard deviation, 5th–95th
percentiles), accuracy with its 95% interval, the paired difference to dense with its bootstrap
interval, and the mean length; and the dynamic row is compared with the fixed row directly
(paired difference, bootstrap interval). Written to ``OUT/ablation.csv`` and ``OUT/ablation.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import json_safe
from .collect import RecordSettings
from .errors import VpstudyError
from .evaluation import _paired_difference, _scores, evaluate, summarize
from .pruning.plan import build_plan
from .rules import BudgetRule
from .runs import Run, open_run

ROWS = (
    "dense",
    "visionpulse-5",
    "visionpulse-10",
    "visionpulse-fitted",
    "topk-fitted-mean",
    "random-fitted-mean",
    "static_topk-fitted-mean",
    "fastv-fitted-mean",
)


class AblationError(VpstudyError):
    """An ablation that cannot run (one-line message)."""


@dataclass(frozen=True)
class AblationRow:
    """One row of the ablation: its label, the pruning method and its ``key=value`` settings
    (``dense``: none), and whether the fitted budget rule is passed to it."""

    label: str
    method: str
    settings: dict[str, str]
    use_rule: bool = False


def _rows(rule: BudgetRule, mean: float | None, n_visual: int, anchor: int) -> list[AblationRow]:
    a = str(anchor)
    rows = [
        AblationRow("dense", "dense", {}),
        AblationRow("visionpulse-5", "visionpulse", {"tau": "0.1", "b_min": "0.01", "b_max": "0.05", "anchor": a}),
        AblationRow("visionpulse-10", "visionpulse", {"tau": "0.4", "b_min": "0.05", "b_max": "0.1", "anchor": a}),
        AblationRow("visionpulse-fitted", "visionpulse", {}, use_rule=True),
    ]
    if mean is None:
        return rows
    count = max(1, round(mean * n_visual))
    fixed = f"{count / n_visual:.10f}"  # floor(ratio · N_v) = the nearest count to the mean (1e-9 guard)
    rows += [
        AblationRow("topk-fitted-mean", "topk", {"ratio": fixed, "anchor": a}),
        AblationRow("random-fitted-mean", "random", {"ratio": f"{mean:.10f}", "anchor": a}),
        AblationRow("static_topk-fitted-mean", "static_topk", {"ratio": fixed, "anchor": a}),
        AblationRow(
            "fastv-fitted-mean", "fastv", {"layer": str(max(1, anchor)), "ratio": f"{1 - count / n_visual:.10f}"}
        ),
    ]
    return rows


def _row_table(label: str, result: dict[str, Any], run: Run) -> dict[str, Any]:
    kept = result["kept_fraction"]
    q = kept.get("quantiles", {})
    deepest = int(run.steps["layer"].max())
    table = run.steps[(run.steps["layer"] == deepest) & (run.steps["step"] >= 1)].merge(
        run.samples[["sample_id", "n_visual"]], on="sample_id"
    )
    values = (table["kept"] if "kept" in table else table["n_visual"]).to_numpy(np.float64) / table[
        "n_visual"
    ].to_numpy(np.float64)
    return {
        "method": label,
        "mean_kept_fraction": kept["mean"],
        "kept_sd": float(values.std()) if len(values) else np.nan,
        "kept_p5": q.get("0.05"),
        "kept_p95": q.get("0.95"),
        "accuracy": result["accuracy"],
        "accuracy_low": result["accuracy_ci95"][0],
        "accuracy_high": result["accuracy_ci95"][1],
        "delta_vs_dense": result.get("delta_vs_dense"),
        "delta_low": (result.get("delta_vs_dense_ci95") or [None] * 2)[0],
        "delta_high": (result.get("delta_vs_dense_ci95") or [None] * 2)[1],
        "mean_length": result["mean_length"],
        "samples": result["samples"],
    }


def run_ablation(
    model: Any,
    processor: Any,
    dataset: Any,
    out: str | Path,
    rule: BudgetRule,
    *,
    settings: RecordSettings,
    dense: Run | None = None,
    model_path: str = "",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run every row into ``OUT/<label>/`` (resuming finished ones) and write the tables.

    Returns:
        (the table, the dynamic-vs-fixed comparison: paired difference with its interval).

    Raises:
        AblationError: the rule has no anchor layer (fit it with ``--layer L`` or ``auto``).
    """
    if rule.layer is None:
        raise AblationError(f"budget rule {rule.name!r} names no anchor layer; fit it with --layer L or --layer auto")
    out = Path(out)
    n_visual = None
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, Run] = {}
    if dense is not None:
        results["dense"], runs["dense"] = json_safe(summarize(dense)), dense
    rows = _rows(rule, None, 0, rule.layer)
    while True:
        for row in rows:
            if row.label in results:
                continue
            plan = build_plan(row.method, row.settings, rule=rule if row.use_rule else None, label=row.label)
            results[row.label] = evaluate(
                model,
                processor,
                dataset,
                out / row.label,
                plan,
                settings=settings,
                dense=runs.get("dense"),
                model_path=model_path,
                progress=progress,
            )
            runs[row.label] = open_run(out / row.label)
        if len(rows) > 4:
            break
        fitted = results["visionpulse-fitted"]["kept_fraction"]["mean"]
        n_visual = int(np.median(runs["dense"].samples["n_visual"]))
        rows = _rows(rule, fitted, n_visual, rule.layer)
    table = pd.DataFrame([_row_table(label, results[label], runs[label]) for label in ROWS])
    dynamic, fixed = (
        _scores(runs[k].samples.set_index("sample_id")) for k in ("visionpulse-fitted", "topk-fitted-mean")
    )
    common = dynamic.index.intersection(fixed.index)
    diff = _paired_difference(dynamic.loc[common].to_numpy(), fixed.loc[common].to_numpy())
    verdict = {
        "dynamic": "visionpulse-fitted",
        "fixed": "topk-fitted-mean",
        "mean_budget": results["visionpulse-fitted"]["kept_fraction"]["mean"],
        "fixed_count": max(1, round(results["visionpulse-fitted"]["kept_fraction"]["mean"] * n_visual)),
        "n_visual": n_visual,
        "difference": diff[0],
        "difference_ci95": [diff[1], diff[2]],
        "anchor_layer": rule.layer,
        "samples": int(len(common)),
    }
    table.to_csv(out / "ablation.csv", index=False)
    (out / "ablation.json").write_text(json.dumps(json_safe(verdict), indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(ablation_markdown(table, verdict), encoding="utf-8")
    return table, verdict


def _pct(v: Any, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.{digits}f}"


def ablation_markdown(table: pd.DataFrame, verdict: dict[str, Any]) -> str:
    """The ablation as a markdown table plus the one-sentence answer."""
    lines = [
        "| row | kept / step: mean ± sd [p5, p95] | accuracy [95% CI] | Δ vs dense, points [95% CI] | mean length |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in table.to_dict(orient="records"):
        delta = (
            "–"
            if r["delta_vs_dense"] is None or np.isnan(r["delta_vs_dense"])
            else (f"{100 * r['delta_vs_dense']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]")
        )
        lines.append(
            f"| {r['method']} | {_pct(r['mean_kept_fraction'])}% ± {_pct(r['kept_sd'])} "
            f"[{_pct(r['kept_p5'])}, {_pct(r['kept_p95'])}] | {_pct(r['accuracy'])}% "
            f"[{_pct(r['accuracy_low'])}, {_pct(r['accuracy_high'])}] | {delta} | {r['mean_length']:.1f} |"
        )
    return "\n".join(lines) + "\n\n" + answer(verdict) + "\n"


def answer(verdict: dict[str, Any]) -> str:
    """The ablation's question answered in one sentence, with its interval."""
    d, (low, high) = verdict["difference"], verdict["difference_ci95"]
    if low > 0:
        word = "beats"
    elif high < 0:
        word = "loses to"
    else:
        word = "does not separate from"
    return (
        f"At equal mean budget ({100 * verdict['mean_budget']:.1f}% of the visual tokens per decode step, anchor "
        f"layer {verdict['anchor_layer']}), the dynamic budget {word} the fixed one here: paired accuracy "
        f"difference {100 * d:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] over {verdict['samples']} samples "
        f"(fixed: K = {verdict['fixed_count']} of {verdict['n_visual']})."
    )
