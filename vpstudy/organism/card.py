"""The measured part of ``data/README.md``, rendered from the JSON files beside the weights.

``python -m vpstudy.organism.card`` rewrites the block between ``<!-- card:begin -->`` and
``<!-- card:end -->`` in ``data/README.md`` from each organism's ``organism.json`` (how it was
trained) and ``evaluation.json`` (what the audit measured), so the card cannot drift from the
files: the test suite renders the block again and compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .model import ORGANISM_FAMILIES
from .shipped import data_dir

BEGIN, END = "<!-- card:begin -->", "<!-- card:end -->"
TARGETS = {"llava": 0.95, "qwen2_vl": 0.90}


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _targets_v2(trained: dict[str, Any], audit: dict[str, Any], best: dict[str, Any]) -> list[str]:
    """The v2 targets, each with its interval, at the anchor chosen from the data."""
    auto = audit["anchor_auto"]
    pulse = next(b for b in auto["budget"] if b["tau"] == 0.1)
    low, high = audit["answer_acc_ci95"]

    def ci(pair: list[float]) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    rows = [
        (
            "held-out answer accuracy",
            "≥ 0.95",
            f"{audit['answer_acc']:.3f} [{low:.3f}, {high:.3f}]",
            audit["answer_acc"] >= 0.95,
        ),
        (
            f"localization at its best layer ({best['layer']})",
            "≥ 0.70",
            f"{best['localization']:.3f} {ci(best['localization_ci95'])}",
            best["localization"] >= 0.70,
        ),
        (
            f"mass contrast AUC, image-reading vs text-only decode steps, at the chosen anchor ({auto['layer']})",
            "≥ 0.8",
            f"{auto['mass_auc_decode']:.3f} {ci(auto['mass_auc_decode_ci95'])}",
            auto["mass_auc_decode"] >= 0.8,
        ),
        (
            f"paper rule's signal (τ 0.1) below b_max = 0.05, decode steps at the chosen anchor ({auto['layer']})",
            "≥ 0.30",
            f"{pulse['below_upper_clamp']:.3f} {ci(pulse['below_upper_clamp_ci95'])}",
            pulse["below_upper_clamp"] >= 0.30,
        ),
    ]
    lines = [
        "",
        "Targets fixed before training (intervals: Wilson for accuracy, bootstrap over samples otherwise):",
        "",
        "| target | goal | measured [95% CI] | met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {goal} | {value} | {'yes' if met else 'no'} |" for name, goal, value, met in rows]
    coverage = ", ".join(f"{k}: {v:.3f}" for k, v in auto["coverage"].items())
    lines += [
        "",
        f"Anchor chosen from the data (`fit-budget --layer auto` criterion on the training split): layer "
        f"{auto['layer']}; share of the deeper layers' visual attention on each layer's top-5% set: {coverage}.",
    ]
    return lines


def _organism(family: str, root: Path, folder_name: str | None = None) -> list[str]:
    folder = root / (folder_name or f"organism-{family}")
    trained: dict[str, Any] = json.loads((folder / "organism.json").read_text())
    audit: dict[str, Any] = json.loads((folder / "evaluation.json").read_text())
    s, arch = trained["settings"], trained["settings"]["arch"]
    best = next(r for r in audit["per_layer"] if r["layer"] == audit["best_layer"])
    low, high = audit["answer_acc_ci95"]
    lines = [
        f"### `{folder.name}`",
        "",
        f"- Made by `{trained['command']}` in {trained['wall_time_s'] / 60:.1f} min on "
        f"{trained['machine']['cpu_count']} CPU cores ({trained['machine']['threads']} torch "
        f"thread{'s' if trained['machine']['threads'] != 1 else ''}), "
        f"{s['steps']} steps of batch {s['batch_size']}; {trained['parameters']:,} parameters, "
        f"{_size_mb(folder):.1f} MB on disk.",
        f"- Text model: {arch['text_layers']} layers, width {arch['text_hidden']}, {arch['heads']} query / "
        f"{arch['kv_heads']} KV heads; vision tower: {arch['vision_layers']} layers, width {arch['vision_hidden']}.",
        f"- Final-answer exact match on the {audit['samples']}-example evaluation set (greedy): "
        f"**{audit['answer_acc']:.3f}** (95% Wilson CI {low:.3f}–{high:.3f}; target ≥ {TARGETS[family]:.2f}). "
        f"Whole-trace exact match {audit['trace_exact']:.3f}; trace-token accuracy {audit['trace_token_acc']:.3f}.",
        "- By question type: " + ", ".join(f"{k} {v:.3f}" for k, v in audit["answer_acc_by_type"].items()) + ".",
        f"- Localization at the best text layer ({best['layer']}): the top-attended visual token lies in the "
        f"referred cells on **{best['localization']:.3f}** of {best['localization_steps']} image-reading steps "
        f"with a referred cell, against a chance rate of {best['chance']:.3f} (referred tokens / N_v; target ≥ 0.70). "
        f"Listing steps ({best['listing_steps']}): {best['localization_listing']:.3f} (top token on any object of "
        f"the listed colour: {best['listing_on_same_colour']:.3f}); content steps "
        f"({best['content_steps']}): {best['localization_content']:.3f}. Best layer for content steps: "
        f"{max(audit['per_layer'], key=lambda r: r['localization_content'])['layer']} "
        f"({max(r['localization_content'] for r in audit['per_layer']):.3f}).",
        "",
        "| layer | localization | listing steps | content steps | chance | referred share of visual mass "
        "| mass, image-reading | mass, text-only | ratio | AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in audit["per_layer"]:
        lines.append(
            f"| {r['layer']} | {r['localization']:.3f} | {r['localization_listing']:.3f} | "
            f"{r['localization_content']:.3f} | {r['chance']:.3f} | {r['referred_share']:.3f} | "
            f"{r['mass_image_reading']:.3f} | {r['mass_text_only']:.3f} | {r['mass_ratio']:.2f} | {r['mass_auc']:.3f} |"
        )
    lines += ["", "VisionPulse budget signal at the anchor layer (max-head visual share of softmax(logits/τ)):", ""]
    lines += [
        "| τ | clamp | anchor layer | below upper clamp: all | image-reading | text-only | at lower clamp |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in audit["budget"]:
        lines.append(
            f"| {b['tau']:g} | [{b['b_min']:g}, {b['b_max']:g}] | {b['anchor_layer']} | {b['below_upper_clamp']:.3f} | "
            f"{b['below_upper_clamp_image_reading']:.3f} | {b['below_upper_clamp_text_only']:.3f} | "
            f"{b['at_lower_clamp']:.3f} |"
        )
    if "anchor_auto" in audit and trained["settings"].get("task") == "v2":
        lines += _targets_v2(trained, audit, best)
    module = folder / "learnpruner.json"
    if module.is_file():
        record = json.loads(module.read_text())
        curve = record["loss"]
        tenth = max(1, len(curve) // 10)
        lines += [
            "",
            f"LearnPruner's pruning module (`learnpruner.safetensors`, {record['settings']['steps']} steps of "
            f"batch {record['settings']['batch_size']}, keep {record['settings']['keep']:g}, "
            f"learning rate {record['settings']['lr']:g}, "
            f"{record['wall_time_s'] / 60:.1f} min): trace loss {sum(curve[:tenth]) / tenth:.3f} over the first "
            f"tenth of the steps, {sum(curve[-tenth:]) / tenth:.3f} over the last.",
        ]
    lines += ["", f"Measured by `{audit['command']}`.", ""]
    return lines


def render(root: Path | None = None) -> str:
    """The card block (markers included) for every organism shipped in ``root``."""
    root = root or data_dir()
    records = (root / "organism-eval" / "data.jsonl").read_text().splitlines()
    lines = [
        BEGIN,
        "",
        f"Evaluation set: {len(records)} examples in `organism-eval/` ({_size_mb(root / 'organism-eval'):.1f} MB).",
        "",
    ]
    for family in ORGANISM_FAMILIES:
        for name in (f"organism-{family}", f"organism-{family}-v2"):
            if (root / name / "evaluation.json").is_file():
                lines += _organism(family, root, name)
    lines.append(END)
    return "\n".join(lines)


def update(readme: Path | None = None) -> Path:
    """Rewrite the card block of ``data/README.md`` in place."""
    readme = readme or data_dir() / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(head + render() + tail)
    return readme


if __name__ == "__main__":
    print(update())
