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
token, whether producing it needs the image); ``token_boxes`` (per trace token, the same cells
as image regions ``[x0, y0, x1, y1]`` in image fractions: the dataset-independent form that
:mod:`vpstudy.annotations` reads); ``scene`` (the objects: cell, colour, shape).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tasks import GRID, QUESTION_TYPES, cell_name, generate

EVAL_SEED = 20261121  # the evaluation set's seed (training draws from the train seed's own stream)
EVAL_SIZE = 600


def data_dir() -> Path:
    """The ``data/`` directory: ``$VPSTUDY_DATA`` if set, else the one beside the package."""
    env = os.environ.get("VPSTUDY_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


VERSIONS = ("v1", "v2")  # organism versions (v2: 256 visual tokens, 8 layers, the v2 task)


def organism_dir(family: str = "llava", version: str = "v1") -> Path:
    """Directory of the shipped organism of ``family`` and ``version``."""
    _check_version(version)
    return data_dir() / (f"organism-{family}" if version == "v1" else f"organism-{family}-{version}")


def eval_set_path(version: str = "v1") -> Path:
    """``data.jsonl`` of the shipped evaluation set of the organism ``version`` (its task)."""
    _check_version(version)
    return data_dir() / ("organism-eval" if version == "v1" else f"organism-eval-{version}") / "data.jsonl"


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown organism version {version!r}; expected one of {', '.join(VERSIONS)}")


def cell_box(cell: int) -> list[float]:
    """The image region of grid cell ``cell`` as ``[x0, y0, x1, y1]`` in image fractions."""
    row, col = divmod(cell, GRID)
    return [col / GRID, row / GRID, (col + 1) / GRID, (row + 1) / GRID]


def write_eval_set(
    out_dir: str | Path, n: int = EVAL_SIZE, seed: int = EVAL_SEED, qtypes: tuple[str, ...] = QUESTION_TYPES
) -> Path:
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
            "token_boxes": [[cell_box(c) for c in cells] for cells in ex.cells],
            "scene": ex.scene.to_json(),
        }
        lines.append(json.dumps(record))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def example_run(
    out: str | Path | None = None,
    *,
    family: str = "llava",
    version: str = "v2",
    samples: int = 16,
    progress: bool = False,
) -> Path:
    """A small run to explore: the shipped organism ``version`` recorded on the first ``samples``
    examples of its evaluation set (every layer, p̄ kept at every layer: ``--store full``, greedy,
    up to 48 tokens), written to ``out`` (default ``runs/example-<version>``) or resumed there.
    The notebooks use it when no run is given. Returns the run directory."""
    from ..collect import RecordSettings, record_dataset
    from ..datasets import load_dataset
    from ..loading import load
    from ..storage import StorePolicy

    model_dir = organism_dir(family, version)
    model, processor = load(model_dir)
    settings = RecordSettings(max_new_tokens=48, batch_size=min(samples, 32), store=StorePolicy.full())
    run = record_dataset(
        model,
        processor,
        load_dataset(eval_set_path(version), limit=samples),
        out if out is not None else Path("runs") / f"example-{version}",
        settings,
        model_path=str(model_dir),
        progress=progress,
    )
    return run.path


if __name__ == "__main__":  # python -m vpstudy.organism.shipped  (re)writes data/organism-eval and -eval-v2
    from .tasks import TASKS

    print(write_eval_set(data_dir() / "organism-eval"))
    print(write_eval_set(eval_set_path("v2").parent, qtypes=TASKS["v2"]))
