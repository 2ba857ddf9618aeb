"""``vpstudy evaluate``: one harness for every pruning method (and dense decoding).

An evaluation is a recording run (the same store as ``vpstudy record``) made with a pruning
plan installed in mask mode under the recorder, plus ``RUN/eval.json``:

- ``accuracy``: the mean of the scorer's per-sample value (samples' ``score``; see
  :mod:`vpstudy.scoring`) with a Wilson 95% CI for 0/1 scorers, a bootstrap CI for graded ones
  (VQA accuracy, ANLS); null, with a ``judge`` line, for a benchmark an LLM judge scores;
- with ``--repeats N`` (samples ``<id>#r<k>``, each example decoded N times with its own
  sampling stream): ``accuracy`` is the mean over examples of each example's mean score, its CI
  a percentile bootstrap that resamples the *examples* (each with all its repeats), and
  ``repeats`` adds the accuracy of each repeat k alone;
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

Under a launcher (``torchrun``, ``accelerate launch``) every rank records its shard of each run
(:mod:`vpstudy.distributed`) and computes the summary of the merged run; rank 0 alone writes
``eval.json`` and the comparison tables.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import json_safe
from .benchmarks import judge_status
from .collect import RecordSettings, record_dataset
from .distributed import launch
from .errors import VpstudyError
from .pruning.plan import PruningPlan, build_plan
from .pruning.registry import COMPARISON_BUDGETS, Entry, comparison_entries
from .rules import BudgetRule
from .runs import Run, open_run
from .scoring import Scorer, final_answer, normalize_answer
from .stats.estimators import bootstrap_mean_ci

EVAL_FILE = "eval.json"
COMPARISON_COLUMNS = (
    "method",
    "mean_kept_fraction",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "mean_length",
    "agreement",
    "delta_vs_dense",
    "delta_low",
    "delta_high",
    "samples",
    "prefill_s",
    "decode_s",
    "decode_ms_per_step",
    "group",
    "display",
    "set_changes_per_step",
)


def _wilson(successes: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(successes, n).proportion_ci(method="wilson")
    return float(ci.low), float(ci.high)


def _paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b (per-sample values of the same samples) with a percentile bootstrap CI."""
    return bootstrap_mean_ci(a.astype(np.float64) - b.astype(np.float64), n_boot=n_boot, level=0.95, seed=seed)


def _scores(samples: pd.DataFrame) -> pd.Series:
    """Per-sample metric values in [0, 1], NaN where unscored: the scorer's ``score`` (a fraction
    for VQA accuracy and ANLS), or ``correct`` as 0/1 in runs recorded without it."""
    if "score" in samples:
        return pd.to_numeric(samples["score"], errors="coerce").astype("float64")
    return samples["correct"].astype("float64")


def _mean_ci(scored: pd.Series) -> tuple[float, float]:
    """Wilson 95% CI for 0/1 outcomes; a percentile bootstrap CI for graded ones."""
    if scored.isin([0.0, 1.0]).all():
        return _wilson(int(scored.sum()), len(scored))
    _, low, high = bootstrap_mean_ci(scored.to_numpy(), n_boot=2000, level=0.95, seed=0)
    return low, high


def set_changes(run: Run) -> dict[str, Any] | None:
    """How often the visible visual set changes from one decode step to the next, at the first
    layer where some stage acts (from the run's ``kept_bits``): per sample, the number of decode
    steps t ≥ 2 whose set differs from step t − 1's; mean and maximum over samples, and the mean
    per decode step. For a prefill method it is 0; for a step-wise one, nearly every step; for
    DSTP, its re-selections (those that changed the set). None for a dense run."""
    boundaries = run.manifest.get("kept_boundaries")
    if not boundaries:
        return None
    per_sample, steps = [], 0
    for sample_id in run.sample_ids:
        bits = run.arrays(sample_id).get("kept_bits")
        if bits is None or len(bits) < 3:
            continue
        sets = bits[1:, 0]  # decode steps, first boundary
        per_sample.append(int((sets[1:] != sets[:-1]).any(-1).sum()))
        steps += len(sets) - 1
    if not per_sample:
        return None
    return {
        "layer": int(boundaries[0]),
        "mean_per_sample": float(np.mean(per_sample)),
        "max": int(max(per_sample)),
        "per_decode_step": float(sum(per_sample) / steps) if steps else float("nan"),
    }


def summarize(run: Run, dense: Run | None = None) -> dict[str, Any]:
    """The ``eval.json`` content of a run (see the module docstring)."""
    samples = run.samples.set_index("sample_id")
    scored = _scores(samples).dropna()
    low, high = _mean_ci(scored)
    deepest = int(run.steps["layer"].max())
    table = run.steps[run.steps["layer"] == deepest].merge(run.samples[["sample_id", "n_visual"]], on="sample_id")
    kept = table["kept"].to_numpy(dtype=np.float64) if "kept" in table else table["n_visual"].to_numpy(dtype=np.float64)
    fraction = kept / table["n_visual"].to_numpy(dtype=np.float64)
    decode = fraction[table["step"].to_numpy() >= 1]
    # one row per decoded batch (a batch decoded again on resume has its own wall times)
    batches = (
        run.samples.drop_duplicates(["batch", "batch_prefill_s", "batch_decode_s"])
        if "batch" in run.samples
        else run.samples.iloc[:0]
    )
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
            "quantiles": {str(q): float(np.quantile(decode, q)) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)}
            if len(decode)
            else {},
            "histogram": np.histogram(decode, bins=10, range=(0.0, 1.0))[0].tolist() if len(decode) else [],
            "steps": int(len(decode)),
        },
        "kept_fraction_step0": float(fraction[table["step"].to_numpy() == 0].mean()),
        "prefill_s": float(batches["batch_prefill_s"].sum()) if len(batches) else float("nan"),
        "decode_s": decode_s,
        "decode_ms_per_step": 1000 * decode_s / decode_steps if decode_steps else float("nan"),
        "timing_note": "forward wall time with the recorder on; see python -m vpstudy.bench.pruning for speed",
    }
    if "source_id" in samples and "repeat" in samples:
        result |= repeats_summary(samples)
    changes = set_changes(run)
    if changes is not None:
        result["kept_set_changes"] = changes
    if dense is not None:
        other = dense.samples.set_index("sample_id")
        common = [i for i in samples.index if i in other.index]
        if common:
            same = [
                normalize_answer(final_answer(samples.loc[i, "generated_text"]))
                == normalize_answer(final_answer(other.loc[i, "generated_text"]))
                for i in common
            ]
            mine, theirs = _scores(samples).loc[common].to_numpy(), _scores(other).loc[common].to_numpy()
            both = ~(np.isnan(mine) | np.isnan(theirs))
            delta, d_low, d_high = _paired_difference(mine[both], theirs[both]) if both.any() else (np.nan,) * 3
            result |= {
                "dense_run": str(dense.path),
                "paired_samples": len(common),
                "agreement": float(np.mean(same)),
                "delta_vs_dense": delta,
                "delta_vs_dense_ci95": [d_low, d_high],
            }
    if (judge := judge_status(run)) is not None:  # an LLM judge's benchmark: no score of ours
        result |= {"accuracy": None, "accuracy_ci95": [None, None], "judge": judge}
    return result


def repeats_summary(samples: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy over repeats (``samples`` indexed by sample id, with ``source_id``, ``repeat`` and
    the scores): the mean over examples of each example's mean score, a percentile bootstrap CI
    that resamples the examples (with all their repeats), and the accuracy of each repeat."""
    table = pd.DataFrame({"source": samples["source_id"], "repeat": samples["repeat"], "score": _scores(samples)})
    table = table.dropna(subset=["score"])
    if table.empty:
        return {}
    per_example = table.groupby("source", sort=False)["score"].mean().to_numpy()
    mean, low, high = bootstrap_mean_ci(per_example, n_boot=n_boot, level=0.95, seed=seed)
    per_repeat = table.groupby("repeat")["score"].mean()
    return {
        "accuracy": float(mean),
        "accuracy_ci95": [low, high],
        "repeats": {
            "n": int(samples["repeat"].nunique()),
            "examples": int(len(per_example)),
            "accuracy_per_repeat": {str(int(k)): float(v) for k, v in per_repeat.items()},
            "interval": "percentile bootstrap over examples, each with all its repeats",
        },
    }


def evaluate(
    model: Any,
    processor: Any,
    dataset: Any,
    out: str | Path,
    plan: PruningPlan | None,
    *,
    settings: RecordSettings,
    scorer: Scorer | None = None,  # None: the benchmark's scorer, else exact match
    dense: Run | None = None,
    model_path: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Record ``dataset`` with ``plan`` (None: dense) into ``out`` and write ``out/eval.json``
    (under a launcher: every rank records its shard and returns the summary; rank 0 writes it)."""
    run = record_dataset(
        model, processor, dataset, out, settings, model_path=model_path, progress=progress, pruning=plan, scorer=scorer
    )
    result = json_safe(summarize(run, dense))
    if launch().main:
        (Path(out) / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


PlannedRun = Entry  # one row of the comparison (kept name)


def comparison_plans(
    n_layers: int, *, budgets: Sequence[float] = COMPARISON_BUDGETS, rule: BudgetRule | None = None
) -> list[Entry]:
    """The rows of ``--method all``: every registered method's rows at each per-step budget
    (:func:`vpstudy.pruning.registry.comparison_entries`), plus the fitted rule's row."""
    return comparison_entries(n_layers, budgets=tuple(budgets), fitted_rule=rule is not None)


def compare(
    model: Any,
    processor: Any,
    dataset: Any,
    out: str | Path,
    *,
    settings: RecordSettings,
    rule: BudgetRule | None = None,
    scorer: Scorer | None = None,
    budgets: Sequence[float] = COMPARISON_BUDGETS,
    dense: Run | None = None,
    extra: Sequence[PlannedRun] = (),
    model_path: str = "",
    anchor: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every plan of :func:`comparison_plans` (then ``extra``) into ``out/<label>/`` and
    write ``out/comparison.csv`` and ``out/comparison.md``. Returns the table.

    ``dense``: an existing dense recording of the same samples and settings to use as the
    dense row (its ``eval.json`` is written into it) instead of recording one. ``anchor``: move
    every row that has an anchor layer (:attr:`Entry.anchor_setting`) to it (e.g. the layer a
    fitted rule chose from data), instead of each method's default depth."""
    out = Path(out)
    n_layers = model.config.get_text_config().num_hidden_layers
    results = {}
    main = launch().main  # under a launcher, rank 0 alone writes the summaries
    if dense is not None:
        results["dense"] = json_safe(summarize(dense))
        if main:
            (dense.path / EVAL_FILE).write_text(json.dumps(results["dense"], indent=2) + "\n", encoding="utf-8")
    rows = [at_anchor(e, anchor) for e in comparison_plans(n_layers, budgets=budgets, rule=rule)] + list(extra)
    unavailable = check_plans(model, rows, rule=rule, seed=settings.seed)
    for label, reason in unavailable.items():
        if main:
            print(f"--method all: row {label} left out: {reason}", file=sys.stderr, flush=True)
    rows = [planned for planned in rows if planned.label not in unavailable]
    for planned in rows:
        if planned.label in results:
            continue
        values = dict(planned.settings)
        if planned.ratio_from is not None:
            values["ratio"] = str(results[planned.ratio_from]["kept_fraction"]["mean"])
        plan = build_plan(planned.method, values, rule=rule if planned.use_rule else None, label=planned.label)
        results[planned.label] = evaluate(
            model,
            processor,
            dataset,
            out / planned.label,
            plan,
            settings=settings,
            scorer=scorer,
            dense=dense,
            model_path=model_path,
            progress=progress,
        )
        if plan is None:
            dense = open_run(out / planned.label)
    table = comparison_table(results, rows)
    if main:
        table.to_csv(out / "comparison.csv", index=False)
        left_out = "".join(f"\n- {label} left out: {reason}" for label, reason in unavailable.items())
        (out / "comparison.md").write_text(
            comparison_markdown(table) + (f"\nRows this model cannot run:{left_out}\n" if left_out else ""),
            encoding="utf-8",
        )
    return table


def at_anchor(entry: Entry, anchor: int | None) -> Entry:
    """``entry`` with its anchor setting moved to ``anchor`` (FastV's layer to max(1, anchor)):
    unchanged when ``anchor`` is None, the row has no anchor, or it uses the fitted rule (whose
    own layer is its anchor)."""
    if anchor is None or entry.anchor_setting is None or entry.use_rule:
        return entry
    value = anchor if entry.anchor_setting == "anchor" else max(1, anchor)
    return replace(entry, settings={**entry.settings, entry.anchor_setting: str(value)})


def check_plans(
    model: Any, rows: Sequence[PlannedRun], *, rule: BudgetRule | None = None, seed: int = 0
) -> dict[str, str]:
    """Build every row's plan and check its methods against ``model`` (and the fitted ``rule``)
    before anything is recorded, so a bad setting is reported before the first run is written. A
    row whose ratio comes from an earlier row's result is checked with a stand-in ratio of 0.5.

    Returns:
        The rows this model cannot run, by label, each with the one-line reason
        (:class:`~vpstudy.pruning.methods.base.MethodUnavailable`: a family the method does not
        support, a trained component the model lacks), and the rows whose ratio would come from
        one of them.

    Raises:
        PruningError / BudgetRuleError: the first row with a bad setting, in one line naming it.
    """
    from .collect import build_pruner
    from .pruning.methods.base import MethodUnavailable

    unavailable: dict[str, str] = {}
    for planned in rows:
        if planned.ratio_from in unavailable:
            unavailable[planned.label] = f"its ratio comes from row {planned.ratio_from}, which cannot run"
            continue
        values = dict(planned.settings)
        if planned.ratio_from is not None:
            values["ratio"] = "0.5"
        try:
            plan = build_plan(planned.method, values, rule=rule if planned.use_rule else None, label=planned.label)
            if plan is not None:
                build_pruner(model, plan, seed)
        except MethodUnavailable as e:
            unavailable[planned.label] = str(e)
        except VpstudyError as e:
            raise type(e)(f"--method all, row {planned.label}: {e}") from None
    return unavailable


def comparison_table(results: dict[str, dict[str, Any]], entries: Sequence[Entry] = ()) -> pd.DataFrame:
    """One row per evaluated method (``eval.json`` contents by label); ``group`` (dense,
    step-wise, prefill, encoder, reference) and ``display`` come from the comparison's rows."""
    known = {e.label: e for e in entries}
    rows = []
    for label, r in results.items():
        entry = known.get(label)
        rows.append(
            {
                "method": label,
                "group": entry.group if entry else _group_of(label),
                "display": entry.display if entry and entry.display else label,
                "set_changes_per_step": (r.get("kept_set_changes") or {}).get("per_decode_step"),
                "mean_kept_fraction": r["kept_fraction"]["mean"],
                "accuracy": r["accuracy"],
                "accuracy_low": r["accuracy_ci95"][0],
                "accuracy_high": r["accuracy_ci95"][1],
                "mean_length": r["mean_length"],
                "agreement": r.get("agreement"),
                "delta_vs_dense": r.get("delta_vs_dense"),
                "delta_low": (r.get("delta_vs_dense_ci95") or [None, None])[0],
                "delta_high": (r.get("delta_vs_dense_ci95") or [None, None])[1],
                "samples": r["samples"],
                "prefill_s": r["prefill_s"],
                "decode_s": r["decode_s"],
                "decode_ms_per_step": r["decode_ms_per_step"],
            }
        )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _group_of(label: str) -> str:
    """The group of a row not in the comparison's entries (an extra row), from its method name."""
    from .pruning.registry import METHODS

    name = label.split("-")[0].split("+")[-1]
    cls = METHODS.get(name)
    if label == "dense":
        return "dense"
    if cls is None:
        return "step-wise"
    return "encoder" if cls.acts_on_encoder else ("step-wise" if cls.step_wise else "prefill")


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a markdown table (accuracy and paired difference to dense with 95% CIs)."""

    def pct(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = [
        "| method | kept visual / step (%) | accuracy (%) [95% CI] | Δ vs dense (points) [95% CI] | "
        "same answer as dense (%) | mean length |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table.to_dict(orient="records"):
        delta = (
            "–"
            if r["delta_vs_dense"] is None or pd.isna(r["delta_vs_dense"])
            else (f"{100 * r['delta_vs_dense']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]")
        )
        lines.append(
            f"| {r['method']} | {pct(r['mean_kept_fraction'])} | {pct(r['accuracy'])} "
            f"[{pct(r['accuracy_low'])}, {pct(r['accuracy_high'])}] | {delta} | {pct(r['agreement'])} | "
            f"{r['mean_length']:.1f} |"
        )
    return "\n".join(lines) + "\n"
