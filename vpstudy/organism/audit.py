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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..rules import anchor_layer, tau_column
from ..collect import RecordSettings, record_dataset
from ..datasets import VisionDataset, load_dataset
from ..runs import Run
from ..stats import auc, mean_ratio
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


def on_path_steps(generated: Sequence[str], reference: Sequence[str], cells: Sequence[Sequence[str]],
                  reads: Sequence[bool], sample: str, scene: Sequence[dict[str, str]] = ()) -> list[StepRow]:  # fmt: skip
    """Steps whose generated prefix equals the reference prefix (including the EOS step).

    ``scene`` (the example's objects) gives listing steps the tokens of every object of the
    listed object's colour."""
    colour_of = {o["cell"]: o["colour"] for o in scene}
    ref = list(reference) + ["</s>"]
    cells = list(cells) + [[]]
    reads = list(reads) + [False]
    rows = []
    for t in range(min(len(generated), len(ref))):
        visual = token_cells_to_visual([cell_index(c) for c in cells[t]])
        listing = ref[t] in CELL_NAMES
        colour = colour_of.get(ref[t]) if listing else None
        same = [cell_index(c) for c, k in colour_of.items() if colour is not None and k == colour]
        rows.append(StepRow(sample, t, bool(reads[t]), visual, listing, token_cells_to_visual(same)))
        if generated[t] != ref[t]:
            break
    return rows


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
        rows += on_path_steps(generated, reference, ex.extra["token_cells"], ex.extra["token_reads_image"], sample_id,
                              ex.extra.get("scene", ()))  # fmt: skip

    # the on-path steps' rows of the steps table, per layer, in the order of ``rows``
    keys = pd.MultiIndex.from_tuples([(row.sample, row.step) for row in rows], names=["sample_id", "step"])
    by_layer = {layer: table.set_index(["sample_id", "step"]).reindex(keys) for layer, table in steps.groupby("layer")}
    reads = np.array([row.reads_image for row in rows], dtype=bool)
    scores = {sid: run.scores(sid).astype(np.float32) for sid in samples.index}  # [S, L, N]
    per_layer = []
    for position, layer in enumerate(layers):
        mass = by_layer[layer]["mass"].to_numpy(dtype=np.float64)
        hits, chance, share = [], [], []
        by_kind: dict[str, list[bool]] = {"listing": [], "content": [], "same_colour": []}
        for row in rows:
            if not row.visual_tokens:
                continue
            p = scores[row.sample][row.step, position]
            top = int(np.argmax(p))
            hits.append(top in row.visual_tokens)
            by_kind["listing" if row.listing else "content"].append(hits[-1])
            if row.listing:
                by_kind["same_colour"].append(top in row.same_colour_tokens)
            chance.append(len(row.visual_tokens) / len(p))
            share.append(float(p[row.visual_tokens].sum() / max(p.sum(), 1e-12)))
        per_layer.append({
            "layer": layer,
            "localization": float(np.mean(hits)),
            "localization_steps": len(hits),
            "localization_listing": float(np.mean(by_kind["listing"])),
            "localization_content": float(np.mean(by_kind["content"])),
            "listing_on_same_colour": float(np.mean(by_kind["same_colour"])),
            "listing_steps": len(by_kind["listing"]),
            "content_steps": len(by_kind["content"]),
            "chance": float(np.mean(chance)),
            "referred_share": float(np.mean(share)),
            "mass_image_reading": float(mass[reads].mean()),
            "mass_text_only": float(mass[~reads].mean()),
            "mass_ratio": mean_ratio(mass, reads),
            "mass_auc": auc(mass, reads),
            "image_reading_steps": int(reads.sum()),
            "text_only_steps": int((~reads).sum()),
        })  # fmt: skip
    best = max(per_layer, key=lambda r: r["localization"])

    anchor = layers[anchor_layer(len(layers))]
    budget = []
    for setting, column in zip(PAPER_SETTINGS, tau_columns, strict=True):
        signal = by_layer[anchor][column].to_numpy()
        below = signal < setting["b_max"]
        budget.append({
            **setting,
            "anchor_layer": int(anchor),
            "below_upper_clamp": float(below.mean()),
            "below_upper_clamp_image_reading": float(below[reads].mean()),
            "below_upper_clamp_text_only": float(below[~reads].mean()),
            "at_lower_clamp": float((signal <= setting["b_min"]).mean()),
            "signal_mean_image_reading": float(signal[reads].mean()),
            "signal_mean_text_only": float(signal[~reads].mean()),
        })  # fmt: skip
    return {
        "samples": n,
        "answer_acc": float(correct.mean()),
        "answer_acc_ci95": [float(ci.low), float(ci.high)],
        "trace_exact": trace_exact / n,
        "trace_token_acc": token_hits / token_total,
        "answer_acc_by_type": {k: float(np.mean(v)) for k, v in sorted(per_type.items())},
        "on_path_steps": len(rows),
        "best_layer": best["layer"],
        "per_layer": per_layer,
        "budget": budget,
    }


def audit(model_dir: str | Path, data: str | Path, run_dir: str | Path, *, limit: int | None = None,
          batch_size: int = 32, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Record ``data`` with the model in ``model_dir`` into ``run_dir`` (resumes) and audit it."""
    from ..loading import load

    dataset = load_dataset(data, limit=limit)
    model, processor = load(model_dir)
    settings = RecordSettings(max_new_tokens=48, batch_size=batch_size)
    run = record_dataset(model, processor, dataset, run_dir, settings, model_path=str(model_dir), progress=progress)
    result = audit_run(run, dataset)
    result["model"] = str(model_dir)
    result["data"] = str(data)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from .shipped import eval_set_path

    parser = argparse.ArgumentParser(prog="python -m vpstudy.organism.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="organism directory")
    parser.add_argument("--data", default=None, help="evaluation set (default: the shipped one)")
    parser.add_argument("--run", default=None, help="run directory for the recording (default: runs/audit-<model>)")
    parser.add_argument("--json", default=None, help="where to write the result (default: <model>/evaluation.json)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    model = Path(args.model)
    data = Path(args.data) if args.data else eval_set_path()
    run_dir = Path(args.run) if args.run else Path("runs") / f"audit-{model.name}"
    result = audit(model, data, run_dir, limit=args.limit)
    result["command"] = "python -m vpstudy.organism.audit " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.json) if args.json else model / "evaluation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    best = next(r for r in result["per_layer"] if r["layer"] == result["best_layer"])
    print(f"answer EM {result['answer_acc']:.3f} (95% CI {result['answer_acc_ci95'][0]:.3f}-{result['answer_acc_ci95'][1]:.3f}), "
          f"trace token acc {result['trace_token_acc']:.3f}; best layer {best['layer']}: localization "
          f"{best['localization']:.3f} vs chance {best['chance']:.3f}; written to {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
