"""Record a dataset into a run: batch, generate under the recorder, write each sample atomically.

:func:`record_dataset` is what ``vpstudy record`` runs. A rerun into the same directory skips
samples already committed (resume), so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .datasets import Example, VisionDataset
from .loading import config_hash, family_of
from .processing import format_prompt, prepare_batch, tokenizer_of
from .provenance import package_versions
from .recorder import DEFAULT_TEMPERATURES, DEFAULT_THRESHOLDS, Recorder, SampleTrace
from .runs import Run, RunWriter, open_run

SCORE_DTYPE = np.float16
# manifest keys that must match for a rerun to resume into an existing run directory
RESUME_KEYS = ("model_config_hash", "generation", "layers", "thresholds", "budget_temperatures", "seed",
               "score_dtype", "method")  # fmt: skip


@dataclass
class RecordSettings:
    """Settings of one recording run (stored in the manifest)."""

    layers: list[int] | None = None  # None: all text layers
    thresholds: list[str] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    max_new_tokens: int = 64
    batch_size: int = 1
    seed: int = 0  # torch seed set before decoding (decoding is greedy; kept for provenance)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # τ of the recorded VisionPulse budget signal


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (exact-match scoring)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def final_answer(generated: str) -> str:
    """The final answer of a generated trace: the words after its last ``answer`` word, or the
    whole text when it has none (a model that answers directly)."""
    words = generated.split()
    marks = [i for i, w in enumerate(words) if normalize_answer(w) == "answer"]
    return " ".join(words[marks[-1] + 1 :]) if marks else generated


def is_correct(generated: str, reference: str | None) -> bool | None:
    """Exact match of :func:`final_answer` with the reference after :func:`normalize_answer`;
    None when the example has no reference."""
    if reference is None:
        return None
    return normalize_answer(final_answer(generated)) == normalize_answer(reference)


def build_manifest(model: Any, model_path: str, dataset: VisionDataset, settings: RecordSettings,
                   layers: list[int], thresholds: list[str]) -> dict[str, Any]:  # fmt: skip
    """The manifest of a recording run (see SPEC, Runs)."""
    spec = family_of(model)
    return {
        "kind": "record",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "path": model_path,
            "family": spec.name,
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "model_config_hash": config_hash(model.config),
        "dataset": {"path": str(dataset.path), "name": dataset.name, "size": len(dataset)},
        "generation": {"max_new_tokens": settings.max_new_tokens, "do_sample": False},
        "batch_size": settings.batch_size,
        "layers": layers,
        "thresholds": thresholds,
        "budget_temperatures": list(settings.temperatures),
        "attention": "head-mean softmax probabilities over all visible keys, temperature 1, float32",
        "method": None,
        "budget_rule": None,
        "seed": settings.seed,
        "score_dtype": np.dtype(SCORE_DTYPE).name,
        "versions": package_versions(),
    }


def _batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield list(examples[start : start + size])


def sample_tables(
    example: Example, dataset_name: str, trace: SampleTrace, token_ids: list[int], tokenizer: Any,
    grid_shape: list[int],
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, np.ndarray]]:  # fmt: skip
    """The samples row, steps rows and score arrays of one recorded sample."""
    token_ids = token_ids[: trace.n_steps]
    texts = tokenizer.convert_ids_to_tokens(token_ids)
    generated = tokenizer.decode(token_ids, skip_special_tokens=True).strip()
    sample = {
        "sample_id": example.id,
        "dataset": dataset_name,
        "prompt": example.question,
        "generated_text": generated,
        "reference_answer": example.answer,
        "correct": is_correct(generated, example.answer),
        "steps": trace.n_steps,
        "n_visual": trace.n_visual,
        "grid_shape": list(grid_shape),
    }
    n_steps, n_layers = trace.mass.shape
    steps = pd.DataFrame(
        {
            "sample_id": example.id,
            "step": np.repeat(np.arange(n_steps), n_layers),
            "layer": np.tile(np.asarray(trace.layers), n_steps),
            "token_id": np.repeat(np.asarray(token_ids, dtype=np.int64), n_layers),
            "token_text": np.repeat(np.asarray(texts, dtype=object), n_layers),
            "mass": trace.mass.reshape(-1),
            "max_head_mass": trace.max_head_mass.reshape(-1),
        }
    )
    for k, threshold in enumerate(trace.thresholds):
        steps[f"active@{threshold.label}"] = trace.active[:, :, k].reshape(-1)
    for k, tau in enumerate(trace.temperatures):
        steps[f"max_head_mass@tau={tau:g}"] = trace.tau_max_head_mass[:, :, k].reshape(-1)
    arrays = {"scores": trace.scores.astype(SCORE_DTYPE), "max_scores": trace.max_scores.astype(np.float32)}
    return sample, steps, arrays


def record_dataset(
    model: Any,
    processor: Any,
    dataset: VisionDataset,
    out: str | Path,
    settings: RecordSettings,
    *,
    model_path: str = "",
    progress: bool = True,
) -> Run:
    """Record every example of ``dataset`` into the run directory ``out`` and return it opened.

    Samples already committed in ``out`` are skipped. Examples are generated greedily in batches
    of ``settings.batch_size`` (left-padded) under a :class:`~vpstudy.recorder.Recorder`.

    Raises:
        RunStoreError: ``out`` holds another schema or a run with different settings.
        DatasetError / InputError / RecorderError: bad examples, images or settings (the run
            keeps every sample finished before the error).
    """
    spec = family_of(model)
    recorder = Recorder(model, layers=settings.layers, thresholds=settings.thresholds,
                        temperatures=settings.temperatures)  # fmt: skip
    thresholds = [t.label for t in recorder.thresholds]
    manifest = build_manifest(model, model_path, dataset, settings, recorder.layers, thresholds)
    writer = RunWriter(out, manifest, compare_keys=RESUME_KEYS)
    done = writer.done_ids
    todo = [ex for ex in dataset if ex.id not in done]
    tokenizer = tokenizer_of(processor)
    torch.manual_seed(settings.seed)
    image_processor = getattr(processor, "image_processor", None)
    context = {"config": model.config, "image_processor": image_processor}
    bar = tqdm(total=len(todo), desc=f"record {dataset.name}", unit="sample", disable=not progress)
    with bar, recorder, torch.inference_mode():
        for batch in _batches(todo, settings.batch_size):
            images = [ex.image() for ex in batch]
            prompts = [format_prompt(processor, spec, ex.question) for ex in batch]
            inputs = prepare_batch(processor, spec, model.config, prompts, images).to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            generated = output[:, inputs["input_ids"].shape[1] :].tolist()
            for b, (example, trace) in enumerate(zip(batch, recorder.traces(), strict=True)):
                grid = spec.grid_shape(inputs, b, context | {"n_visual": trace.n_visual})
                writer.write_sample(*sample_tables(example, dataset.name, trace, generated[b], tokenizer, grid))
            bar.update(len(batch))
    return open_run(out)


def summary_line(run: Run) -> str:
    """One line describing a finished run (samples, steps, layers, mean mass, accuracy)."""
    samples, steps = run.samples, run.steps
    parts = [f"{len(samples)} samples", f"{len(steps)} step-layer rows", f"layers {run.manifest['layers']}"]
    if len(steps):
        parts.append(f"mean visual mass {steps['mass'].mean():.3f}")
    scored = samples["correct"].dropna() if "correct" in samples else []
    if len(scored):
        parts.append(f"exact match {float(np.mean(scored.astype(bool))):.1%}")
    return f"{run.path}: " + ", ".join(parts)

