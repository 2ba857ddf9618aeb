"""Does the organism look where its trace says it should? Measured with the recorder.

``python -m vpstudy.organism.audit --model data/organism-llava`` records the evaluation set
(greedy decoding, every text layer) and writes ``evaluation.json`` beside the model with:

- accuracy: final-answer exact match (Wilson 95% CI), whole-trace exact match, position-wise
  trace-token accuracy, per question type;
- per text layer, over *on-path* steps (the generated prefix so far equals the reference, so the
  reference annotation of the token the step predicts applies):
  - localization: share of steps with referred cells whose top-attended visual token lies in
    those cells, against the chance rate (referred tokens / N_v, averaged over the same steps);
    also split by step kind: *listing* steps (the token is a cell name: where the next object of
    a colour is) and *content* steps (the token is a colour, shape or ``empty`` read off a cell);
    and, for listing steps, how often the top token lies on *any* object of the listed colour;
  - referred share: the share of the step's visual mass that falls on the referred cells;
  - mass contrast: mean visual mass on image-reading vs. text-only steps, their ratio, and the
    AUC of mass for telling them apart (Mann–Whitney U / (n₁n₂), scipy);
- budget: at the anchor layer (same relative depth as 17 of 36), for both published VisionPulse
  settings, how often the max-head visual share at τ lies below the upper clamp b_max (where
  the budget is set by the signal rather than by the clamp), per step kind.

The audit records with ``--store full`` (p̄ at every layer). On a run with another store policy
(:mod:`vpstudy.storage`) localization and the referred share are measured at the layers whose p̄
it keeps (None elsewhere), the data-driven anchor needs two of them, and ``notes`` says in one
line each what was left out and what to record instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..collect import RecordSettings, record_dataset
from ..datasets import VisionDataset, load_dataset
from ..rules import anchor_layer, tau_column
from ..runs import Run
from ..stats import auc, mean_ratio, scores_note
from ..storage import StorePolicy
from .tasks import CELL_NAMES, cell_index, token_cells_to_visual

PAPER_SETTINGS = ({"tau": 0.1, "b_min": 0.01, "b_max": 0.05}, {"tau": 0.4, "b_min": 0.05, "b_max": 0.10})


@dataclass
class StepRow:
    """One on-path step of one sample: what the reference says about the token it predicts."""

    sample: str
    step: int
    reads_image: bool
    visual_tokens: list[int]  # referred visual-token indices (empty: no single cell)
    listing: bool = False  # the token names a cell (listing where objects are), not a cell's content
    same_colour_tokens: list[int] = field(default_factory=list)  # listing steps: every object of that colour


def on_path_steps(
    generated: Sequence[str],
    reference: Sequence[str],
    cells: Sequence[Sequence[str]],
    reads: Sequence[bool],
    sample: str,
    scene: Sequence[dict[str, str]] = (),
    tokens_per_side: int = 8,
) -> list[StepRow]:
    """Steps whose generated prefix equals the reference prefix (including the EOS step).

    ``scene`` (the example's objects) gives listing steps the tokens of every object of the
    listed object's colour; ``tokens_per_side`` is the organism's visual token grid (8 for v1's
    64 tokens, 16 for v2's 256)."""
    colour_of = {o["cell"]: o["colour"] for o in scene}
    ref = list(reference) + ["</s>"]
    cells = list(cells) + [[]]
    reads = list(reads) + [False]
    rows = []
    for t in range(min(len(generated), len(ref))):
        visual = token_cells_to_visual([cell_index(c) for c in cells[t]], tokens_per_side)
        listing = ref[t] in CELL_NAMES
        colour = colour_of.get(ref[t]) if listing else None
        same = [cell_index(c) for c, k in colour_of.items() if colour is not None and k == colour]
        rows.append(StepRow(sample, t, bool(reads[t]), visual, listing, token_cells_to_visual(same, tokens_per_side)))
        if generated[t] != ref[t]:
            break
    return rows


def _mean(values: np.ndarray, _labels: np.ndarray | None = None) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _cluster_ci(
    values: np.ndarray,
    groups: np.ndarray,
    statistic,
    labels: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[float]:
    """95% percentile interval of ``statistic(values[, labels])`` over pooled rows, resampling the
    samples (``groups``) with replacement: steps of one trace are not independent."""
    from ..stats.estimators import cluster_bootstrap_ci

    names = list(dict.fromkeys(groups.tolist()))
    if len(names) < 2:
        return [float("nan"), float("nan")]
    xs = [values[groups == g] for g in names]
    ys = [(labels if labels is not None else np.zeros(len(values)))[groups == g].astype(float) for g in names]
    stat = (lambda x, y: statistic(x, y.astype(bool))) if labels is not None else (lambda x, y: statistic(x))
    _, low, high = cluster_bootstrap_ci(xs, ys, stat, n_boot=n_boot, seed=seed)
    return [low, high]


def audit_run(run: Run, dataset: VisionDataset) -> dict[str, Any]:
    """The measurements described in the module docstring, from a recorded run of the set."""
    import pandas as pd
    from scipy.stats import binomtest

    examples = {ex.id: ex for ex in dataset}
    samples = run.samples.set_index("sample_id")
    steps = run.steps
    layers = sorted(steps["layer"].unique().tolist())
    tau_columns = [tau_column(s["tau"]) for s in PAPER_SETTINGS]
    tokens = steps[steps["layer"] == layers[0]].sort_values(["sample_id", "step"]).groupby("sample_id")["token_text"]
    generated_by_sample = tokens.agg(list)

    correct = samples["correct"].astype(bool)
    n = len(samples)
    ci = binomtest(int(correct.sum()), n).proportion_ci(method="wilson")
    trace_exact, token_hits, token_total = 0, 0, 0
    per_type: dict[str, list[bool]] = {}
    rows: list[StepRow] = []
    for sample_id, sample in samples.iterrows():
        ex = examples[sample_id]
        reference = ex.extra["trace"].split()
        generated = generated_by_sample[sample_id]
        trace_exact += generated == reference + ["</s>"]
        padded = generated + [None] * max(0, len(reference) + 1 - len(generated))
        token_hits += sum(g == r for g, r in zip(padded, reference + ["</s>"], strict=False))
        token_total += len(reference) + 1
        per_type.setdefault(ex.extra["qtype"], []).append(bool(sample["correct"]))
        side = math.isqrt(int(sample["n_visual"]))
        rows += on_path_steps(
            generated,
            reference,
            ex.extra["token_cells"],
            ex.extra["token_reads_image"],
            sample_id,
            ex.extra.get("scene", ()),
            side,
        )

    # the on-path steps' rows of the steps table, per layer, in the order of ``rows``
    keys = pd.MultiIndex.from_tuples([(row.sample, row.step) for row in rows], names=["sample_id", "step"])
    by_layer = {layer: table.set_index(["sample_id", "step"]).reindex(keys) for layer, table in steps.groupby("layer")}
    reads = np.array([row.reads_image for row in rows], dtype=bool)
    row_sample = np.array([row.sample for row in rows], dtype=object)
    row_step = np.array([row.step for row in rows])
    kept = run.score_layers  # the layers whose p̄ the run keeps
    notes = [n for n in [scores_note(run, "localization and the referred share", layers)] if n]
    scores = {sid: run.scores(sid) for sid in samples.index} if kept else {}  # [S, score layers, N] memory-mapped
    per_layer = []
    for layer in layers:
        mass = by_layer[layer]["mass"].to_numpy(dtype=np.float64)
        hits, chance, share, hit_sample = [], [], [], []
        by_kind: dict[str, list[bool]] = {"listing": [], "content": [], "same_colour": []}
        for row in rows if layer in kept else []:
            if not row.visual_tokens:
                continue
            p = np.asarray(scores[row.sample][row.step, kept.index(layer)], dtype=np.float32)
            top = int(np.argmax(p))
            hits.append(top in row.visual_tokens)
            hit_sample.append(row.sample)
            by_kind["listing" if row.listing else "content"].append(hits[-1])
            if row.listing:
                by_kind["same_colour"].append(top in row.same_colour_tokens)
            chance.append(len(row.visual_tokens) / len(p))
            share.append(float(p[row.visual_tokens].sum() / max(p.sum(), 1e-12)))
        localized = layer in kept
        per_layer.append(
            {
                "layer": layer,
                "localization": float(np.mean(hits)) if localized else None,
                "localization_steps": len(hits),
                "localization_ci95": _cluster_ci(np.asarray(hits, float), np.asarray(hit_sample, dtype=object), _mean)
                if localized
                else None,
                "localization_listing": float(np.mean(by_kind["listing"])) if localized else None,
                "localization_content": float(np.mean(by_kind["content"])) if localized else None,
                "listing_on_same_colour": float(np.mean(by_kind["same_colour"])) if localized else None,
                "listing_steps": len(by_kind["listing"]),
                "content_steps": len(by_kind["content"]),
                "chance": float(np.mean(chance)) if localized else None,
                "referred_share": float(np.mean(share)) if localized else None,
                "mass_image_reading": float(mass[reads].mean()),
                "mass_text_only": float(mass[~reads].mean()),
                "mass_ratio": mean_ratio(mass, reads),
                "mass_auc": auc(mass, reads),
                "mass_auc_ci95": _cluster_ci(mass, row_sample, auc, reads),
                "mass_auc_decode": auc(mass[row_step >= 1], reads[row_step >= 1]),
                "mass_auc_decode_ci95": _cluster_ci(
                    mass[row_step >= 1], row_sample[row_step >= 1], auc, reads[row_step >= 1]
                ),
                "image_reading_steps": int(reads.sum()),
                "text_only_steps": int((~reads).sum()),
            }
        )
    localized_layers = [r for r in per_layer if r["localization"] is not None]
    best = max(localized_layers, key=lambda r: r["localization"]) if localized_layers else None

    anchor = layers[anchor_layer(len(layers))]
    budget = []
    for setting, column in zip(PAPER_SETTINGS, tau_columns, strict=True):
        signal = by_layer[anchor][column].to_numpy()
        below = signal < setting["b_max"]
        budget.append(
            {
                **setting,
                "anchor_layer": int(anchor),
                "below_upper_clamp": float(below.mean()),
                "below_upper_clamp_image_reading": float(below[reads].mean()),
                "below_upper_clamp_text_only": float(below[~reads].mean()),
                "at_lower_clamp": float((signal <= setting["b_min"]).mean()),
                "signal_mean_image_reading": float(signal[reads].mean()),
                "signal_mean_text_only": float(signal[~reads].mean()),
            }
        )
    from ..rules import BudgetRuleError
    from ..stats.fit import _split, anchor_coverage

    train_ids, _ = _split(run.sample_ids, 0.3, 0)  # the split `fit-budget --layer auto` uses by default
    try:
        coverage = anchor_coverage(run, train_ids, 0.05)
    except BudgetRuleError as e:  # p̄ at fewer than two layers
        notes.append(f"anchor_auto left out: {e}")
        coverage = None
    result = {
        "anchor_auto": _anchor_auto(steps, per_layer, coverage, tau_columns) if coverage else None,
        "samples": n,
        "answer_acc": float(correct.mean()),
        "answer_acc_ci95": [float(ci.low), float(ci.high)],
        "trace_exact": trace_exact / n,
        "trace_token_acc": token_hits / token_total,
        "answer_acc_by_type": {k: float(np.mean(v)) for k, v in sorted(per_type.items())},
        "on_path_steps": len(rows),
        "best_layer": best["layer"] if best is not None else None,
        "per_layer": per_layer,
        "budget": budget,
    }
    return result | ({"notes": notes} if notes else {})


def _anchor_auto(steps: Any, per_layer: list[dict[str, Any]], coverage: dict[int, float],
                 tau_columns: list[str]) -> dict[str, Any]:  # fmt: skip
    """The data-driven anchor (the coverage criterion of ``fit-budget --layer auto``) and, at the
    chosen layer, the decode steps' mass AUC and how often each paper setting's signal lies below
    its upper clamp."""
    from ..stats.fit import choose_anchor

    chosen = choose_anchor(coverage)
    decode = steps[(steps["layer"] == chosen) & (steps["step"] >= 1)]
    chosen_budget = []
    for setting, column in zip(PAPER_SETTINGS, tau_columns, strict=True):
        below = (decode[column].to_numpy() < setting["b_max"]).astype(float)
        chosen_budget.append(
            {
                **setting,
                "anchor_layer": int(chosen),
                "decode_steps": int(len(below)),
                "below_upper_clamp": float(below.mean()),
                "below_upper_clamp_ci95": _cluster_ci(below, decode["sample_id"].to_numpy(object), _mean),
            }
        )
    at_chosen = next(r for r in per_layer if r["layer"] == chosen)
    return {
        "layer": int(chosen),
        "criterion_budget": 0.05,
        "coverage": {str(k): v for k, v in coverage.items()},
        "mass_auc_decode": at_chosen["mass_auc_decode"],
        "mass_auc_decode_ci95": at_chosen["mass_auc_decode_ci95"],
        "budget": chosen_budget,
    }


def audit(
    model_dir: str | Path,
    data: str | Path,
    run_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Record ``data`` with the model in ``model_dir`` into ``run_dir`` (resumes) and audit it."""
    from ..loading import load

    dataset = load_dataset(data, limit=limit)
    model, processor = load(model_dir)
    settings = RecordSettings(max_new_tokens=48, batch_size=batch_size, store=StorePolicy.full())  # per layer
    run = record_dataset(model, processor, dataset, run_dir, settings, model_path=str(model_dir), progress=progress)
    result = audit_run(run, dataset)
    result["model"] = str(model_dir)
    result["data"] = str(data)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpstudy.organism.audit``: audit an organism, write ``<model>/evaluation.json``
    and print one summary line; ``argv`` defaults to the command line. Returns the exit status."""
    from .shipped import eval_set_path

    parser = argparse.ArgumentParser(prog="python -m vpstudy.organism.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="organism directory")
    parser.add_argument("--data", default=None, help="evaluation set (default: the shipped one)")
    parser.add_argument("--run", default=None, help="run directory for the recording (default: runs/audit-<model>)")
    parser.add_argument("--json", default=None, help="where to write the result (default: <model>/evaluation.json)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    model = Path(args.model)
    task = (
        json.loads((model / "organism.json").read_text()).get("settings", {}).get("task", "v1")
        if (model / "organism.json").is_file()
        else "v1"
    )
    data = Path(args.data) if args.data else eval_set_path(task)
    run_dir = Path(args.run) if args.run else Path("runs") / f"audit-{model.name}"
    result = audit(model, data, run_dir, limit=args.limit)
    result["command"] = "python -m vpstudy.organism.audit " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.json) if args.json else model / "evaluation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    best = next((r for r in result["per_layer"] if r["layer"] == result["best_layer"]), None)
    where = (f"best layer {best['layer']}: localization {best['localization']:.3f} vs chance {best['chance']:.3f}"
             if best is not None else "no layer with p̄ to localize")  # fmt: skip
    print(
        f"answer EM {result['answer_acc']:.3f} "
        f"(95% CI {result['answer_acc_ci95'][0]:.3f}-{result['answer_acc_ci95'][1]:.3f}), "
        f"trace token acc {result['trace_token_acc']:.3f}; {where}; written to {out}"
    )
    for note in result.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
