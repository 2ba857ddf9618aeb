"""Where the shipped organisms and their evaluation set live, and how the set is written.

``data/`` (beside the package in a source checkout; override with ``VPSTUDY_DATA``) holds

- ``organism-llava/`` and ``organism-qwen2_vl/``: trained organisms in ``save_pretrained`` form,
  each with ``organism.json`` (how it was trained), ``train_log.csv`` and ``evaluation.json``
  (what :mod:`vpstudy.organism.audit` measured on the evaluation set);
- ``organism-eval/``: the fixed evaluation set, ``data.jsonl`` + ``images/``, in the dataset
  format of :mod:`vpstudy.datasets`, written by :func:`write_eval_set`.

Each record of the evaluation set has ``id``, ``image``, ``question``, ``answer`` and, as extra
fields: ``qtype``; ``trace`` (the reference trace, space-separated); ``token_cells`` (per trace
token, the grid cells it states, as names like ``"b3"``); ``token_reads_image`` (per trace
token, whether producing it needs the image); ``scene`` (the objects: cell, colour, shape).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tasks import QUESTION_TYPES, cell_name, generate

EVAL_SEED = 20261121  # the evaluation set's seed (training draws from the train seed's own stream)
EVAL_SIZE = 600


def data_dir() -> Path:
    """The ``data/`` directory: ``$VPSTUDY_DATA`` if set, else the one beside the package."""
    env = os.environ.get("VPSTUDY_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def organism_dir(family: str = "llava") -> Path:
    """Directory of the shipped organism of ``family``."""
    return data_dir() / f"organism-{family}"


def eval_set_path() -> Path:
    """``data.jsonl`` of the shipped evaluation set."""
    return data_dir() / "organism-eval" / "data.jsonl"


def write_eval_set(out_dir: str | Path, n: int = EVAL_SIZE, seed: int = EVAL_SEED,
                   qtypes: tuple[str, ...] = QUESTION_TYPES) -> Path:  # fmt: skip
    """Write ``n`` generated examples (PNG images + ``data.jsonl``) to ``out_dir``.

    Deterministic: the same ``n`` and ``seed`` give byte-identical files. Returns the
    ``data.jsonl`` path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(generate(n, seed, qtypes)):
        image = f"images/{i:04d}.png"
        ex.scene.render().save(out / image, optimize=True)
        record = {
            "id": f"organism-{i:04d}",
            "image": image,
            "question": ex.question,
            "answer": ex.answer,
            "qtype": ex.qtype,
            "trace": " ".join(ex.trace),
            "token_cells": [[cell_name(c) for c in cells] for cells in ex.cells],
            "token_reads_image": ex.reads_image,
            "scene": ex.scene.to_json(),
        }
        lines.append(json.dumps(record))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":  # python -m vpstudy.organism.shipped  (re)writes data/organism-eval
    print(write_eval_set(data_dir() / "organism-eval"))
