"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

N_V, LAYERS = 64, [0, 1, 2, 3]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``root``: equal snapshots mean nothing was touched."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def planted_organism_run(root: Path, score_layers: list[int] | None = None) -> tuple[Any, Any, dict[str, list]]:
    """A run over 8 organism evaluation examples whose generated traces equal the references,
    with planted scores: layer 1 puts a 0.3 peak on a referred token on 70% of the steps that
    refer to cells (elsewhere otherwise) and gives image-reading steps more mass; the other
    layers are flat. With ``score_layers``, the same run as ``--store analysis`` keeps it: p̄
    only at those layers (everything else is identical). Returns (opened run, dataset, truth)."""
    import vpstudy
    from vpstudy.rules import anchor_layer
    from vpstudy.collect import sample_tables
    from vpstudy.datasets import load_dataset
    from vpstudy.organism.model import build_parts
    from vpstudy.organism.shipped import write_eval_set
    from vpstudy.organism.tasks import CELL_NAMES, cell_index, token_cells_to_visual
    from vpstudy.recorder import SampleTrace
    from vpstudy.rules import Threshold
    from vpstudy.runs import RunWriter

    dataset = load_dataset(write_eval_set(root / "data", n=8, seed=3))
    tokenizer = build_parts("llava").tokenizer
    rng = np.random.default_rng(0)
    manifest: dict[str, Any] = {"kind": "record", "layers": LAYERS}
    if score_layers is not None:
        manifest["store"] = {"policy": "analysis", "score_layers": score_layers}
    writer = RunWriter(root / "run", manifest)
    truth = {"hits": [], "listing": [], "read": [], "text": [], "signal": [], "is_read": []}
    for example in dataset:
        words = example.extra["trace"].split() + ["</s>"]
        cells = example.extra["token_cells"] + [[]]
        reads = example.extra["token_reads_image"] + [False]
        steps = len(words)
        scores = np.full((steps, len(LAYERS), N_V), 0.001, dtype=np.float32)
        for t in range(steps):
            referred = token_cells_to_visual([cell_index(c) for c in cells[t]])
            mass = rng.uniform(0.4, 0.8) if reads[t] else rng.uniform(0.31, 0.5)
            (truth["read"] if reads[t] else truth["text"]).append(mass)
            outside = [i for i in range(N_V) if i not in referred]
            hit = bool(referred) and rng.random() < 0.7
            peak = int(rng.choice(referred)) if hit else int(rng.choice(outside))
            if referred:
                truth["hits"].append(hit)
                truth["listing"].append(words[t] in CELL_NAMES)
            scores[t, 1] = (mass - 0.3) / (N_V - 1)
            scores[t, 1, peak] = 0.3  # layer 1 holds the plant; the other layers are flat
        signal = rng.uniform(0.0, 0.12, size=(steps, len(LAYERS), 2)).astype(np.float32)
        truth["signal"] += signal[:, anchor_layer(len(LAYERS)), 0].tolist()
        truth["is_read"] += reads
        trace = SampleTrace(
            layers=LAYERS, thresholds=[Threshold(0.001)], visual_positions=np.arange(N_V),
            mass=scores.sum(-1), max_head_mass=scores.sum(-1), active=(scores > 0.001).sum(-1, keepdims=True),
            max_scores=scores.max(0), temperatures=[0.1, 0.4], tau_max_head_mass=signal,
            scores=scores if score_layers is None else scores[:, [LAYERS.index(x) for x in score_layers]],
            score_layers=score_layers,
        )  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids(words)
        writer.write_sample(*sample_tables(example, dataset.name, trace, ids, tokenizer, [8, 8]))
    return vpstudy.open_run(root / "run"), dataset, truth


def restrict_store(run_dir: Path, policy: str) -> None:
    """Turn a ``--store full`` run into what ``--store <policy>`` records of the same generation:
    p̄ per step only at the analysis layer (``analysis``) or nowhere (``scalars``); the steps
    table and ``max_scores`` are the same under every policy (tests/test_store.py checks that the
    recorder writes exactly this)."""
    import json

    from vpstudy.storage import analysis_layer

    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    layers = manifest["layers"]
    assert manifest.get("store", {}).get("policy", "full") == "full", "restrict a full run"
    keep = [analysis_layer(layers)] if policy == "analysis" else []
    for scores in run_dir.glob("arrays/*/scores.npy"):
        if keep:
            np.save(scores, np.load(scores)[:, [layers.index(x) for x in keep]])
        else:
            scores.unlink()
    manifest["store"] = {"policy": policy, "score_layers": keep}
    manifest_path.write_text(json.dumps(manifest, indent=2))
