"""Per-step annotations of a recorded run, from a dataset that says what each trace token needs.

A dataset may annotate its reference traces (extra fields of a record, see
:mod:`vpstudy.datasets`):

- ``trace``: the reference trace, as a list of tokens or a space-separated string, in the
  tokenization of the model (the organism's tokenizer is word-level, so its words are tokens);
- ``token_reads_image``: per trace token, whether producing it needs the image;
- ``token_boxes``: per trace token, the image regions it refers to, as a list of boxes
  ``[x0, y0, x1, y1]`` in fractions of the image width and height (``[]``: none).

A run's step ``t`` predicts generated token ``t`` (docs/design.md, "Definitions"), so it is annotated with
reference token ``t`` when the model is *on the reference path* there: every token it generated
before ``t`` equals the reference's. The step after the last reference token (where the
reference ends, e.g. the EOS step) is on the path as a text-only step without regions. Off-path
steps carry no annotation and are left out of the annotated statistics.

Regions map onto visual tokens through the sample's ``grid_shape`` ``(h, w)`` (row-major, ``h·w
= N_v``): a visual token belongs to a box when its centre lies inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .datasets import VisionDataset
from .errors import VpstudyError
from .runs import Run
from .scoring import THINK_CLOSE, THINK_OPEN


class AnnotationError(VpstudyError):
    """A dataset's trace annotations are malformed or do not match the run."""


@dataclass(frozen=True)
class StepAnnotation:
    """What the reference says about the token one on-path step predicts."""

    sample_id: str
    step: int
    reads_image: bool
    region: tuple[int, ...]  # visual-token indices (row-major) the token refers to; () = none


def region_tokens(boxes: Sequence[Sequence[float]], grid_shape: Sequence[int]) -> tuple[int, ...]:
    """Sorted visual-token indices whose centre lies in any of ``boxes``.

    Args:
        boxes: ``[x0, y0, x1, y1]`` in image fractions (0..1), x to the right, y down.
        grid_shape: ``(h, w)`` of the visual-token grid, tokens numbered row-major.
    """
    h, w = int(grid_shape[0]), int(grid_shape[1])
    cy, cx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    inside = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return tuple(np.flatnonzero(inside.reshape(-1)).tolist())


def _trace_tokens(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise AnnotationError(f"{where}: 'trace' must be a string or a list of strings")


def _per_token(values: object, name: str, n_tokens: int, where: str) -> list[Any]:
    """``values`` if it is a list of one entry per trace token, else a one-line error."""
    if not isinstance(values, list) or len(values) != n_tokens:
        raise AnnotationError(f"{where}: '{name}' needs one entry per trace token ({n_tokens})")
    return values


def _word(token_text: object) -> str:
    """A generated token's text as a trace word: word-boundary markers (▁, Ġ) and spaces dropped."""
    return str(token_text).replace("\u2581", " ").replace("\u0120", " ").strip()


def has_annotations(dataset: VisionDataset, field_name: str = "token_reads_image") -> bool:
    """Whether every example of ``dataset`` carries ``trace`` and ``field_name``."""
    return len(dataset) > 0 and all("trace" in ex.extra and field_name in ex.extra for ex in dataset)


def step_annotations(run: Run, dataset: VisionDataset) -> list[StepAnnotation]:
    """Annotations of every on-path step of every sample of ``run`` found in ``dataset``.

    Raises:
        AnnotationError: a run sample is missing from the dataset, or an example's annotation
            lists do not have one entry per trace token (the message names the record).
    """
    examples = {ex.id: ex for ex in dataset}
    first_layer = run.steps["layer"].min()
    texts = (
        run.steps[run.steps["layer"] == first_layer]
        .sort_values(["sample_id", "step"])
        .groupby("sample_id")["token_text"]
        .agg(list)
    )
    out: list[StepAnnotation] = []
    for sample in run.samples.itertuples(index=False):
        ex = examples.get(sample.sample_id)
        if ex is None:
            raise AnnotationError(f"{dataset.path}: run sample {sample.sample_id!r} is not in this dataset")
        reference = _trace_tokens(ex.extra.get("trace"), ex.source)
        reads = _per_token(ex.extra.get("token_reads_image"), "token_reads_image", len(reference), ex.source)
        boxes = _per_token(
            ex.extra.get("token_boxes", [[] for _ in reference]), "token_boxes", len(reference), ex.source
        )
        grid = tuple(np.asarray(sample.grid_shape).tolist())
        if int(np.prod(grid)) != int(sample.n_visual) and any(boxes):
            raise AnnotationError(
                f"{run.path}: sample {sample.sample_id!r} has grid_shape {grid} for {sample.n_visual} visual "
                "tokens; its regions cannot be mapped"
            )
        generated = [_word(t) for t in texts.get(sample.sample_id, [])]
        for t in range(min(len(generated), len(reference) + 1)):
            if t < len(reference):
                out.append(StepAnnotation(sample.sample_id, t, bool(reads[t]), region_tokens(boxes[t], grid)))
            else:
                out.append(StepAnnotation(sample.sample_id, t, False, ()))
            if t < len(reference) and generated[t] != reference[t]:
                break
    return out


def annotation_frame(annotations: Sequence[StepAnnotation]) -> pd.DataFrame:
    """The annotations as a table: ``sample_id, step, reads_image, region`` (tuple of indices)."""
    return pd.DataFrame(
        {
            "sample_id": [a.sample_id for a in annotations],
            "step": np.array([a.step for a in annotations], dtype=np.int64),
            "reads_image": np.array([a.reads_image for a in annotations], dtype=bool),
            "region": [a.region for a in annotations],
        }
    )


def think_phases(run: Run) -> pd.DataFrame:
    """Which steps of a reasoning model's traces are inside its ``<think>…</think>`` block.

    Read from the run alone: the generated token texts (``token_text``) and ``answer_text`` (None
    for a trace still reasoning when it ended, see :func:`vpstudy.scoring.answer_text`). A step is
    ``think`` from the trace's start (the chat template of a thinking model opens ``<think>`` in the
    prompt) or from a generated ``<think>`` token, through the step that generates ``</think>``;
    the steps after the last ``</think>`` are ``answer``. A trace with no ``</think>`` is all
    ``think`` when it has no answer (cut inside its reasoning) and all ``answer`` otherwise (a
    model that does not reason).

    Returns:
        A table ``sample_id, step, phase`` with one row per recorded step, phase ``"think"`` or
        ``"answer"``.
    """
    first_layer = run.steps["layer"].min()
    texts = (
        run.steps[run.steps["layer"] == first_layer]
        .sort_values(["sample_id", "step"])
        .groupby("sample_id")["token_text"]
        .agg(list)
    )
    no_answer = dict(zip(run.samples["sample_id"], run.samples["answer_text"].isna(), strict=True))
    frames = []
    for sample_id, tokens in texts.items():
        words = [str(t).strip() for t in tokens]
        closes = [i for i, w in enumerate(words) if w == THINK_CLOSE]
        phase = np.full(len(words), "answer", dtype=object)
        if closes:
            opens = [i for i, w in enumerate(words[: closes[-1]]) if w == THINK_OPEN]
            phase[(opens[0] if opens else 0) : closes[-1] + 1] = "think"
        elif no_answer.get(sample_id, False):
            phase[:] = "think"
        frames.append(pd.DataFrame({"sample_id": sample_id, "step": np.arange(len(words)), "phase": phase}))
    if not frames:
        return pd.DataFrame({"sample_id": [], "step": np.array([], dtype=np.int64), "phase": []})
    return pd.concat(frames, ignore_index=True)


def has_think_steps(run: Run) -> bool:
    """Whether some recorded step of ``run`` is inside a ``<think>`` block (:func:`think_phases`)."""
    return bool((think_phases(run)["phase"] == "think").any())
