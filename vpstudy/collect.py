"""Record a dataset into a run: batch, generate under the recorder, write each sample atomically.

:func:`record_dataset` is what ``vpstudy record`` runs. A rerun into the same directory skips
samples already committed (resume), so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
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
from .pruning import KeptTrace, Pruner
from .pruning.plan import PruningPlan
from .scoring import Scorer, final_answer, is_correct, normalize_answer  # noqa: F401 (re-exported)
from .loading import config_hash, family_of
from .processing import format_prompt, prepare_batch, tokenizer_of
from .provenance import package_versions
from .recorder import DEFAULT_TEMPERATURES, DEFAULT_THRESHOLDS, Recorder, SampleTrace
from .rules import active_column, tau_column
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
    grid_shape: list[int], *, kept: KeptTrace | None = None, scorer: Scorer | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, np.ndarray]]:  # fmt: skip
    """The samples row, steps rows and arrays of one recorded sample.

    With ``kept`` (a pruned generation) the steps gain ``kept`` (visible visual tokens at that
    step and layer) and the arrays ``kept_bits``: the visible sets at the pruner's boundary
    layers, [S, boundaries, ceil(N_v / 8)] uint8 (``np.packbits`` along the last axis, little
    bit order). ``scorer`` decides ``correct`` (default: exact match of the final answer).
    """
    token_ids = token_ids[: trace.n_steps]
    texts = tokenizer.convert_ids_to_tokens(token_ids)
    generated = tokenizer.decode(token_ids, skip_special_tokens=True).strip()
    correct = (scorer.score(generated, example.answer, example.choices) if scorer is not None
               else is_correct(generated, example.answer))  # fmt: skip
    sample = {
        "sample_id": example.id,
        "dataset": dataset_name,
        "prompt": example.question,
        "generated_text": generated,
        "reference_answer": example.answer,
        "correct": correct,
        "steps": trace.n_steps,
        "n_visual": trace.n_visual,
        "grid_shape": list(grid_shape),
        **(extra or {}),
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
        steps[active_column(threshold)] = trace.active[:, :, k].reshape(-1)
    for k, tau in enumerate(trace.temperatures):
        steps[tau_column(tau)] = trace.tau_max_head_mass[:, :, k].reshape(-1)
    arrays = {"scores": trace.scores.astype(SCORE_DTYPE), "max_scores": trace.max_scores.astype(np.float32)}
    if kept is not None:
        layer_index = np.asarray(trace.layers)
        steps["kept"] = kept.counts[:n_steps][:, layer_index].reshape(-1).astype(np.int32)
        arrays["kept_bits"] = np.packbits(kept.masks[:n_steps], axis=-1, bitorder="little")
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
    pruning: PruningPlan | None = None,
    scorer: Scorer | None = None,
) -> Run:
    """Record every example of ``dataset`` into the run directory ``out`` and return it opened.

    Samples already committed in ``out`` are skipped. Examples are generated greedily in batches
    of ``settings.batch_size`` (left-padded) under a :class:`~vpstudy.recorder.Recorder`; with
    ``pruning``, also under a :class:`~vpstudy.pruning.Pruner` in mask mode inside it, so the
    recorder sees the attention the pruned model computes. Each samples row holds the wall time
    of its batch's prefill and decode forwards (``batch_prefill_s``, ``batch_decode_s``,
    ``batch_decode_steps``, ``batch``), measured with the recorder on.

    Raises:
        RunStoreError: ``out`` holds another schema or a run with different settings.
        DatasetError / InputError / RecorderError: bad examples, images or settings (the run
            keeps every sample finished before the error).
    """
    spec = family_of(model)
    recorder = Recorder(model, layers=settings.layers, thresholds=settings.thresholds,
                        temperatures=settings.temperatures)  # fmt: skip
    thresholds = [t.label for t in recorder.thresholds]
    # built (and its methods checked against the model) before anything is written
    pruner = Pruner(model, pruning.methods, mode="mask", seed=settings.seed) if pruning is not None else None
    manifest = build_manifest(model, model_path, dataset, settings, recorder.layers, thresholds)
    if pruning is not None:
        manifest |= {"method": pruning.description(), "budget_rule": pruning.rule_json(),
                     "kept_boundaries": pruner.boundaries,
                     "scorer": scorer.name if scorer is not None else "exact_match"}  # fmt: skip
    elif scorer is not None:
        manifest["scorer"] = scorer.name
    writer = RunWriter(out, manifest, compare_keys=RESUME_KEYS)
    done = writer.done_ids
    todo = [ex for ex in dataset if ex.id not in done]
    tokenizer = tokenizer_of(processor)
    torch.manual_seed(settings.seed)
    image_processor = getattr(processor, "image_processor", None)
    context = {"config": model.config, "image_processor": image_processor}
    label = dataset.name if pruning is None else f"{pruning.name} {dataset.name}"
    bar = tqdm(total=len(todo), desc=f"record {label}", unit="sample", disable=not progress)
    timer = _ForwardTimer(model)
    with bar, recorder, pruner or nullcontext(), timer, torch.inference_mode():
        for batch in _batches(todo, settings.batch_size):
            images = [ex.image() for ex in batch]
            prompts = [format_prompt(processor, spec, ex.question) for ex in batch]
            inputs = prepare_batch(processor, spec, model.config, prompts, images).to(model.device)
            timer.reset()
            output = model.generate(
                **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            generated = output[:, inputs["input_ids"].shape[1] :].tolist()
            kept = pruner.kept() if pruner is not None else [None] * len(batch)
            timing = {"batch": writer.next_seq, **timer.summary()}  # the batch's first commit number: unique
            for b, (example, trace) in enumerate(zip(batch, recorder.traces(), strict=True)):
                grid = spec.grid_shape(inputs, b, context | {"n_visual": trace.n_visual})
                writer.write_sample(*sample_tables(example, dataset.name, trace, generated[b], tokenizer, grid,
                                                   kept=kept[b], scorer=scorer, extra=timing))  # fmt: skip
            bar.update(len(batch))
    return open_run(out)


class _ForwardTimer:
    """Wall time of the model's forward passes within one ``generate`` call: the first is the
    prefill, the others are decode steps."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._hooks: list[Any] = []
        self._start = 0.0
        self.times: list[float] = []

    def __enter__(self) -> _ForwardTimer:
        self._hooks = [self.model.register_forward_pre_hook(self._before),
                       self.model.register_forward_hook(self._after)]  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def _before(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _after(self, *_: Any) -> None:
        self.times.append(time.perf_counter() - self._start)

    def reset(self) -> None:
        self.times = []

    def summary(self) -> dict[str, float | int]:
        return {"batch_prefill_s": self.times[0] if self.times else 0.0, "batch_decode_s": float(sum(self.times[1:])),
                "batch_decode_steps": max(0, len(self.times) - 1)}  # fmt: skip


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

