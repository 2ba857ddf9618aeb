"""``vpstudy evaluate``: one harness for every pruning method (and dense decoding).

An evaluation is a recording run (the same store as ``vpstudy record``) made with a pruning
plan installed in mask mode under the recorder, plus ``RUN/eval.json``:

- ``accuracy`` with its Wilson 95% CI (scorer: see :mod:`vpstudy.scoring`);
- ``mean_length``: generated steps per sample (EOS step included);
- ``kept_fraction``: visible visual tokens at the deepest text layer (where every stage of the
  plan applies) over N_v, per decode step (steps ≥ 1) pooled over samples: mean, quantiles and a
  histogram; ``kept_fraction_step0`` for the prefill's last row;
- with a dense run of the same samples: ``agreement`` (same normalised final answer) and the
  paired accuracy difference to dense with a bootstrap CI over samples;
- ``prefill_s`` and ``decode_s``: summed forward wall time, measured with the recorder on (so it
  is not a speed benchmark: ``python -m vpstudy.bench.pruning`` is).

``vpstudy evaluate --method all`` runs :func:`comparison_plans` into one directory and writes
``comparison.csv`` and ``comparison.md`` (one row per method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import json_safe
from .rules import BudgetRule, anchor_layer
from .collect import RecordSettings, record_dataset
from .pruning import PyramidDrop
from .pruning.plan import PruningPlan, build_plan
from .runs import Run, open_run
from .stats.estimators import bootstrap_mean_ci
from .scoring import Scorer, final_answer, get_scorer, normalize_answer

EVAL_FILE = "eval.json"
COMPARISON_COLUMNS = ("method", "mean_kept_fraction", "accuracy", "accuracy_low", "accuracy_high", "mean_length",
                      "agreement", "delta_vs_dense", "delta_low", "delta_high", "samples", "prefill_s", "decode_s",
                      "decode_ms_per_step")  # fmt: skip


def _wilson(successes: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(successes, n).proportion_ci(method="wilson")
    return float(ci.low), float(ci.high)


def _paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b (per-sample 0/1 outcomes of the same samples) with a percentile bootstrap CI."""
    return bootstrap_mean_ci(a.astype(np.float64) - b.astype(np.float64), n_boot=n_boot, level=0.95, seed=seed)


def summarize(run: Run, dense: Run | None = None) -> dict[str, Any]:
    """The ``eval.json`` content of a run (see the module docstring)."""
    samples = run.samples.set_index("sample_id")
    scored = samples["correct"].dropna().astype(bool)
    low, high = _wilson(int(scored.sum()), len(scored))
    deepest = int(run.steps["layer"].max())
    table = run.steps[run.steps["layer"] == deepest].merge(run.samples[["sample_id", "n_visual"]], on="sample_id")
    kept = table["kept"].to_numpy(dtype=np.float64) if "kept" in table else table["n_visual"].to_numpy(dtype=np.float64)
    fraction = kept / table["n_visual"].to_numpy(dtype=np.float64)
    decode = fraction[table["step"].to_numpy() >= 1]
    batches = run.samples.drop_duplicates("batch") if "batch" in run.samples else run.samples.iloc[:0]
    decode_s = float(batches["batch_decode_s"].sum()) if len(batches) else float("nan")
    decode_steps = int(batches["batch_decode_steps"].sum()) if len(batches) else 0
    result: dict[str, Any] = {
        "run": str(run.path),
        "method": run.manifest.get("method") or {"name": "dense", "methods": []},
        "budget_rule": run.manifest.get("budget_rule"),
        "scorer": run.manifest.get("scorer", "exact_match"),
        "samples": len(samples),
        "accuracy": float(scored.mean()) if len(scored) else float("nan"),
        "accuracy_ci95": [low, high],
        "mean_length": float(samples["steps"].mean()),
        "kept_layer": deepest,
        "kept_fraction": {
            "mean": float(decode.mean()) if len(decode) else float("nan"),
            "quantiles": {str(q): float(np.quantile(decode, q)) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)} if len(decode) else {},  # fmt: skip
            "histogram": np.histogram(decode, bins=10, range=(0.0, 1.0))[0].tolist() if len(decode) else [],
            "steps": int(len(decode)),
        },
        "kept_fraction_step0": float(fraction[table["step"].to_numpy() == 0].mean()),
        "prefill_s": float(batches["batch_prefill_s"].sum()) if len(batches) else float("nan"),
        "decode_s": decode_s,
        "decode_ms_per_step": 1000 * decode_s / decode_steps if decode_steps else float("nan"),
        "timing_note": "forward wall time with the recorder on; see python -m vpstudy.bench.pruning for speed",
    }
    if dense is not None:
        other = dense.samples.set_index("sample_id")
        common = [i for i in samples.index if i in other.index]
        if common:
            same = [normalize_answer(final_answer(samples.loc[i, "generated_text"]))
                    == normalize_answer(final_answer(other.loc[i, "generated_text"])) for i in common]  # fmt: skip
            mine = samples.loc[common, "correct"].astype(bool).to_numpy()
            theirs = other.loc[common, "correct"].astype(bool).to_numpy()
            delta, d_low, d_high = _paired_difference(mine, theirs)
            result |= {"dense_run": str(dense.path), "paired_samples": len(common), "agreement": float(np.mean(same)),
                       "delta_vs_dense": delta, "delta_vs_dense_ci95": [d_low, d_high]}  # fmt: skip
    return result


def evaluate(model: Any, processor: Any, dataset: Any, out: str | Path, plan: PruningPlan | None, *,
             settings: RecordSettings, scorer: Scorer | None = None, dense: Run | None = None,
             model_path: str = "", progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Record ``dataset`` with ``plan`` (None: dense) into ``out`` and write ``out/eval.json``."""
    run = record_dataset(model, processor, dataset, out, settings, model_path=model_path, progress=progress,
                         pruning=plan, scorer=scorer or get_scorer("exact_match"))  # fmt: skip
    result = json_safe(summarize(run, dense))
    (Path(out) / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


@dataclass(frozen=True)
class PlannedRun:
    """One row of the comparison: a directory label, the method spec and settings."""

    label: str
    method: str
    settings: dict[str, str]
    use_rule: bool = False


def comparison_plans(n_layers: int, *, budget: float = 0.05, rule: BudgetRule | None = None) -> list[PlannedRun]:
    """The methods of ``--method all``, at a budget of ``budget`` of the visual tokens per step
    where a method has one (VisionPulse's paper settings as published)."""
    anchor = anchor_layer(n_layers)
    pct = f"{100 * budget:g}"
    # PyramidDrop keeps λ of the remaining tokens at each of its (up to) three stages: λ^stages = budget
    stages = len(PyramidDrop().stages(n_layers))
    plans = [
        PlannedRun("dense", "dense", {}),
        PlannedRun("visionpulse-5", "visionpulse", {"tau": "0.1", "b_min": "0.01", "b_max": "0.05"}),
        PlannedRun("visionpulse-10", "visionpulse", {"tau": "0.4", "b_min": "0.05", "b_max": "0.1"}),
    ]
    if rule is not None:
        plans.append(PlannedRun("visionpulse-fitted", "visionpulse", {}, use_rule=True))
    plans += [
        PlannedRun(f"topk-{pct}", "topk", {"ratio": str(budget)}),
        PlannedRun("topp-50", "topp", {"p": "0.5"}),
        PlannedRun("random-like-visionpulse-5", "random", {}),  # ratio: VisionPulse-5's mean kept fraction
        PlannedRun(f"static_topk-{pct}", "static_topk", {"ratio": str(budget)}),
        PlannedRun(f"fastv-{pct}", "fastv", {"layer": str(max(1, anchor)), "ratio": str(1 - budget)}),
        PlannedRun(f"pyramiddrop-{pct}", "pyramiddrop", {"keep_ratio": f"{budget ** (1 / stages):.4f}"}),
        PlannedRun("fastv50+visionpulse-5", "fastv+visionpulse",
                   {"fastv.layer": str(max(1, anchor)), "fastv.ratio": "0.5", "visionpulse.tau": "0.1",
                    "visionpulse.b_min": "0.01", "visionpulse.b_max": "0.05"}),
    ]  # fmt: skip
    return plans


def compare(model: Any, processor: Any, dataset: Any, out: str | Path, *, settings: RecordSettings,
            rule: BudgetRule | None = None, scorer: Scorer | None = None, budget: float = 0.05,
            dense: Run | None = None, extra: Sequence[PlannedRun] = (), model_path: str = "",
            progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Run every plan of :func:`comparison_plans` (then ``extra``) into ``out/<label>/`` and
    write ``out/comparison.csv`` and ``out/comparison.md``. Returns the table.

    ``dense``: an existing dense recording of the same samples and settings to use as the
    dense row (its ``eval.json`` is written into it) instead of recording one."""
    out = Path(out)
    n_layers = model.config.get_text_config().num_hidden_layers
    results = {}
    if dense is not None:
        results["dense"] = json_safe(summarize(dense))
        (dense.path / EVAL_FILE).write_text(json.dumps(results["dense"], indent=2) + "\n", encoding="utf-8")
    for planned in [*comparison_plans(n_layers, budget=budget, rule=rule), *extra]:
        if planned.label in results:
            continue
        values = dict(planned.settings)
        if planned.method == "random":
            values["ratio"] = str(results["visionpulse-5"]["kept_fraction"]["mean"])
        plan = build_plan(planned.method, values, rule=rule if planned.use_rule else None, label=planned.label)
        results[planned.label] = evaluate(model, processor, dataset, out / planned.label, plan, settings=settings,
                                          scorer=scorer, dense=dense, model_path=model_path, progress=progress)  # fmt: skip
        if plan is None:
            dense = open_run(out / planned.label)
    table = comparison_table(results)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison_markdown(table), encoding="utf-8")
    return table


def comparison_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluated method (``eval.json`` contents by label)."""
    rows = []
    for label, r in results.items():
        rows.append({
            "method": label, "mean_kept_fraction": r["kept_fraction"]["mean"], "accuracy": r["accuracy"],
            "accuracy_low": r["accuracy_ci95"][0], "accuracy_high": r["accuracy_ci95"][1],
            "mean_length": r["mean_length"], "agreement": r.get("agreement"), "delta_vs_dense": r.get("delta_vs_dense"),
            "delta_low": (r.get("delta_vs_dense_ci95") or [None, None])[0],
            "delta_high": (r.get("delta_vs_dense_ci95") or [None, None])[1], "samples": r["samples"],
            "prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "decode_ms_per_step": r["decode_ms_per_step"],
        })  # fmt: skip
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a markdown table (accuracy and paired difference to dense with 95% CIs)."""

    def pct(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = ["| method | kept visual / step (%) | accuracy (%) [95% CI] | Δ vs dense (points) [95% CI] | "
             "same answer as dense (%) | mean length |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in table.to_dict(orient="records"):
        delta = "–" if r["delta_vs_dense"] is None or pd.isna(r["delta_vs_dense"]) else (
            f"{100 * r['delta_vs_dense']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]")  # fmt: skip
        lines.append(f"| {r['method']} | {pct(r['mean_kept_fraction'])} | {pct(r['accuracy'])} "
                     f"[{pct(r['accuracy_low'])}, {pct(r['accuracy_high'])}] | {delta} | {pct(r['agreement'])} | "
                     f"{r['mean_length']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
