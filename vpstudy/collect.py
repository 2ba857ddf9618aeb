"""Record a dataset into a run: batch, generate under the recorder, write each sample atomically.

:func:`record_dataset` is what ``vpstudy record`` runs. A rerun into the same directory skips
samples already committed (resume), so a killed run loses at most the batch in flight.

What a sample keeps is the run's store policy (``RecordSettings.store``,
:class:`vpstudy.storage.StorePolicy`; default ``analysis``: p̄ per step at the analysis layer
only). p̄ leaves the device in float16 chunks and each chunk is appended to its sample's staged
``scores`` array as it arrives (:class:`_ScoreSpool`, :meth:`vpstudy.runs.RunWriter.stage`), so
neither the device nor the host holds a whole trace of p̄; the sample is committed as before.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .benchmarks import benchmark_scorer, export_for_judge
from .caching import generate_kwargs, resolve_cache
from .datasets import Example, VisionDataset
from .distributed import Launch, Shard, check_world_size, launch, run_sharded
from .errors import VpstudyWarning
from .loading import config_hash, family_of
from .processing import format_prompt, prepare_batch, tokenizer_of
from .provenance import package_versions
from .pruning import KeptTrace, Pruner
from .pruning.plan import PruningPlan
from .recorder import DEFAULT_TEMPERATURES, DEFAULT_THRESHOLDS, Recorder, SampleTrace
from .rules import active_column, tau_column
from .runs import Run, RunStoreError, RunWriter, StagedSample, merge_runs, open_run, peek_manifest
from .sampling import Sampling, SamplingError, sample_seed
from .scoring import ExactMatch, Scorer, answer_text, final_answer, is_correct, normalize_answer, opens_think  # noqa: F401 (re-exported)
from .storage import StorePolicy, estimate, estimate_line
from .tracebuffer import TraceChunk

SCORE_DTYPE = np.float16
# manifest keys that must match for a rerun to resume into an existing run directory
RESUME_KEYS = ("model_config_hash", "generation", "layers", "thresholds", "budget_temperatures", "seed",
               "score_dtype", "method", "store")  # fmt: skip


@dataclass
class RecordSettings:
    """Settings of one recording run (stored in the manifest)."""

    layers: list[int] | None = None  # None: all text layers
    thresholds: list[str] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    max_new_tokens: int = 64
    batch_size: int = 1
    seed: int = 0  # torch seed set before decoding (decoding is greedy; kept for provenance)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # τ of the recorded VisionPulse budget signal
    cache: str = "auto"  # KV cache: static, dynamic, or auto (static where exact; vpstudy.caching.resolve_cache)
    sampling: Sampling | None = None  # None: greedy; else one seeded stream per sample (vpstudy.sampling)
    repeats: int = 1  # decodes of each example, stored as samples "<id>#r<k>" (needs sampling when > 1)
    store: StorePolicy = field(default_factory=StorePolicy)  # which layers keep p̄ per step (vpstudy.storage)


def build_manifest(model: Any, model_path: str, dataset: VisionDataset, settings: RecordSettings,
                   layers: list[int], thresholds: list[str]) -> dict[str, Any]:  # fmt: skip
    """The manifest of a recording run: model, dataset (with its fingerprint), settings, versions."""
    spec = family_of(model)
    return {
        "kind": "record",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "path": model_path,
            "family": spec.name,
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "revision": getattr(model, "vpstudy_revision", None),  # a hub model's snapshot (None: a directory)
        },
        "model_config_hash": config_hash(model.config),
        "dataset": {"path": str(dataset.path), "name": dataset.name, "size": len(dataset),
                    "fingerprint": dataset.fingerprint() if hasattr(dataset, "fingerprint") else None},
        "generation": generation_entry(settings),
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


def generation_entry(settings: RecordSettings) -> dict[str, Any]:
    """The manifest's ``generation``: ``max_new_tokens`` and ``do_sample``, the sampling settings
    when sampled, ``repeats`` when above 1 (a greedy run's entry is what it always was)."""
    entry: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
    if settings.sampling is not None:
        entry |= settings.sampling.manifest_entry()
    if settings.repeats > 1:
        entry["repeats"] = settings.repeats
    return entry


REPEAT_MARK = "#r"  # a repeat's sample id: "<example id>#r<k>", k = 0 … repeats − 1


def run_examples(dataset: Sequence[Example], repeats: int = 1) -> list[Example]:
    """The samples of a run in the order a single process decodes them: each example, and with
    ``repeats`` > 1 each example ``repeats`` times in a row as ``<id>#r<k>``."""
    if repeats == 1:
        return list(dataset)
    return [dataclasses.replace(ex, id=f"{ex.id}{REPEAT_MARK}{k}") for ex in dataset for k in range(repeats)]


def repeat_columns(sample_id: str, repeats: int) -> dict[str, Any]:
    """``source_id`` (the example's own id) and ``repeat`` (k) of a repeat's samples row; none
    without repeats."""
    if repeats == 1:
        return {}
    source, _, k = sample_id.rpartition(REPEAT_MARK)
    return {"source_id": source, "repeat": int(k)}


def _batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield list(examples[start : start + size])


def sample_tables(
    example: Example, dataset_name: str, trace: SampleTrace, token_ids: list[int], tokenizer: Any,
    grid_shape: list[int], *, kept: KeptTrace | None = None, scorer: Scorer | None = None,
    extra: dict[str, Any] | None = None, thinking: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, np.ndarray]]:  # fmt: skip
    """The samples row, steps rows and arrays of one recorded sample.

    With ``kept`` (a pruned generation) the steps gain ``kept`` (visible visual tokens at that
    step and layer) and the arrays ``kept_bits``: the visible sets at the pruner's boundary
    layers, [S, boundaries, ceil(N_v / 8)] uint8 (``np.packbits`` along the last axis, little
    bit order). ``scorer`` gives ``score`` (its value in [0, 1], None when unscored) and
    ``correct`` (full credit; default scorer: exact match of the final answer); ``answer_text``
    is the text it read, after any ``</think>`` (None for a trace cut inside its reasoning;
    ``thinking``: the prompt opened ``<think>``, see :func:`vpstudy.scoring.answer_text`).
    """
    token_ids = token_ids[: trace.n_steps]
    texts = tokenizer.convert_ids_to_tokens(token_ids)
    generated = tokenizer.decode(token_ids, skip_special_tokens=True).strip()
    value = (scorer or ExactMatch()).value_example(generated, example, thinking=thinking)
    sample = {
        "sample_id": example.id,
        "dataset": dataset_name,
        "prompt": example.question,
        "generated_text": generated,
        "answer_text": answer_text(generated, thinking=thinking),
        "reference_answer": example.answer,
        "correct": None if value is None else value >= 1.0,
        "score": value,
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
    if trace.temperatures:
        tau_mass = trace.tau_max_head_mass  # [S, L, T]: the recorder fills it whenever it has temperatures
        if tau_mass is None:
            raise ValueError(f"sample {example.id!r}: a trace with temperatures and no tau_max_head_mass")
        for k, tau in enumerate(trace.temperatures):
            steps[tau_column(tau)] = tau_mass[:, :, k].reshape(-1)
    arrays: dict[str, np.ndarray] = {"max_scores": trace.max_scores.astype(np.float32)}
    if trace.scores is not None:  # else written chunk by chunk (a staged sample) or not kept (no score layer)
        arrays["scores"] = trace.scores.astype(SCORE_DTYPE)
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
    shard: Shard | None = None,
    estimate_size: bool | None = None,
) -> Run:
    """Record every example of ``dataset`` into the run directory ``out`` and return it opened.

    Samples already committed in ``out`` are skipped. Examples are generated greedily in batches
    of ``settings.batch_size`` (left-padded) under a :class:`~vpstudy.recorder.Recorder`; with
    ``pruning``, also under a :class:`~vpstudy.pruning.Pruner` in mask mode inside it, so the
    recorder sees the attention the pruned model computes. Each samples row holds the wall time
    of its batch's prefill and decode forwards (``batch_prefill_s``, ``batch_decode_s``,
    ``batch_decode_steps``), measured with the recorder on, and ``batch``, the batch's index in
    the run's order.

    Batches are formed over the whole run (``settings.repeats`` decodes of each example, see
    :func:`run_examples`), never over what is left to do: a resumed batch is decoded whole
    again and its missing samples written, so every sample is decoded in the same batch, with
    the same padding, as in an uninterrupted run. With ``settings.sampling``, each sample draws
    from its own stream seeded by ``settings.seed`` and its id (:mod:`vpstudy.sampling`).

    Under a launcher (``torchrun``, ``accelerate launch``: world size > 1) each rank records its
    batches into its shard and rank 0 merges them into ``out`` (:mod:`vpstudy.distributed`);
    every rank returns the merged run. ``shard`` (set by that path) records one rank's batches.

    ``settings.store`` says what a sample keeps (module docstring). Before the first generation
    one line on stderr estimates a sample's size on disk at ``max_new_tokens`` and the recorder's
    peak memory (:func:`vpstudy.storage.estimate`), when ``estimate_size`` (default: ``progress``).

    Raises:
        StorePolicyError: ``--score-layers`` out of range or not recorded (nothing written).
        RunStoreError: ``out`` holds another schema, or a run with different settings or from
            another dataset (:func:`check_same_dataset`).
        DatasetError / InputError / RecorderError: bad examples, images or settings (the run
            keeps every sample finished before the error).
    """
    if settings.repeats > 1 and settings.sampling is None:
        raise SamplingError(f"--repeats {settings.repeats} decodes each example {settings.repeats} times, and greedy "
                            "decoding makes the repeats identical; add --sample or --paper-sampling")  # fmt: skip
    if settings.repeats > 1 and getattr(getattr(dataset, "benchmark", None), "judged", False):
        raise SamplingError(f"--repeats: {dataset.name} is scored by an LLM judge, whose input holds one answer per "
                            "question; run each repeat as its own run with another --seed")  # fmt: skip
    if shard is None:
        info = launch()
        if info.distributed:
            return _record_sharded(model, processor, dataset, out, settings, info, model_path=model_path,
                                   progress=progress, pruning=pruning, scorer=scorer)  # fmt: skip
        check_world_size(out, 1)
    spec = family_of(model)
    scorer = scorer if scorer is not None else benchmark_scorer(dataset)  # a benchmark's own scorer
    recorder = Recorder(model, layers=settings.layers, thresholds=settings.thresholds,
                        temperatures=settings.temperatures, store=settings.store,
                        score_dtype=torch.float16)  # fmt: skip
    thresholds = [t.label for t in recorder.thresholds]
    # built (and its methods checked against the model) before anything is written
    pruner = build_pruner(model, pruning, settings.seed) if pruning is not None else None
    cache = resolve_cache(model, settings.cache)  # CacheError before anything is written
    manifest = build_manifest(model, model_path, dataset, settings, recorder.layers, thresholds)
    manifest["cache"] = cache
    manifest |= store_manifest(settings.store, recorder.score_layers, shard.out if shard is not None else out)
    if pruning is not None and pruner is not None:  # the pruner is built exactly when pruning is given
        manifest |= {"method": pruning.description(), "budget_rule": pruning.rule_json(),
                     "kept_boundaries": pruner.boundaries,
                     "scorer": scorer.name if scorer is not None else "exact_match"}  # fmt: skip
    elif scorer is not None:
        manifest["scorer"] = scorer.name
    if shard is not None:
        manifest["shard"] = shard.manifest_entry()
        check_same_dataset(shard.out, manifest)  # the merged run, before the shard is written
        check_resumable(shard.out, manifest)
    check_same_dataset(out, manifest)
    writer = RunWriter(out, manifest, compare_keys=RESUME_KEYS)
    done = writer.done_ids | (shard.skip if shard is not None else frozenset())
    batches = [(b, batch) for b, batch in enumerate(_batches(run_examples(dataset, settings.repeats),
                                                             settings.batch_size))
               if (shard is None or shard.takes(b)) and any(ex.id not in done for ex in batch)]  # fmt: skip
    todo = [ex for _, batch in batches for ex in batch if ex.id not in done]
    tokenizer = tokenizer_of(processor)
    torch.manual_seed(settings.seed)
    image_processor = getattr(processor, "image_processor", None)
    context = {"config": model.config, "image_processor": image_processor}
    label = dataset.name if pruning is None else f"{pruning.name} {dataset.name}"
    label += f" [rank {shard.rank}/{shard.world_size}]" if shard is not None else ""
    bar = tqdm(total=len(todo), desc=f"record {label}", unit="sample", disable=not progress)
    timer = _ForwardTimer(model)
    warned = False
    announce = progress if estimate_size is None else estimate_size
    with bar, recorder, pruner or nullcontext(), timer, torch.inference_mode():
        for index, batch in batches:
            images = [ex.image() for ex in batch]
            prompts = [format_prompt(processor, spec, ex.question) for ex in batch]
            names = [ex.source for ex in batch]  # error messages name the record
            inputs = prepare_batch(processor, spec, model.config, prompts, images, names).to(model.device)
            if not warned:
                warned = _warn_past_positions(model, inputs["input_ids"].shape[1], settings.max_new_tokens, batch[0])
            if announce:  # before the run's first generation: what a sample will cost
                tqdm.write(_estimate(model, recorder, inputs["input_ids"], settings), file=sys.stderr)
                announce = False
            timer.reset()
            # a static cache as long as this batch needs: transformers otherwise keeps the longest one of the
            # process's earlier batches, and the values would depend on which batches ran before (a shard's)
            vars(model).pop("_previous_max_cache_length", None)
            spool = _ScoreSpool(writer, [ex.id for ex in batch], done) if recorder.score_layers else None
            recorder.sink = spool  # p̄ goes to the samples' staged arrays chunk by chunk
            try:
                output = model.generate(
                    **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, **generate_kwargs(cache), **_sampler(settings, batch),
                )  # fmt: skip
                generated = output[:, inputs["input_ids"].shape[1] :].tolist()
                kept = pruner.kept() if pruner is not None else [None] * len(batch)
                timing = {"batch": index, **timer.summary()}  # the batch's index in the run's order
                for b, (example, trace) in enumerate(zip(batch, recorder.traces(), strict=True)):
                    if example.id in done:  # a resumed batch: decoded whole again, its missing samples written
                        continue
                    extra = {**timing, **repeat_columns(example.id, settings.repeats)}
                    grid = spec.grid_shape(inputs, b, context | {"n_visual": trace.n_visual})
                    writer.write_sample(*sample_tables(example, dataset.name, trace, generated[b], tokenizer, grid,
                                                       kept=kept[b], scorer=scorer, extra=extra,
                                                       thinking=opens_think(prompts[b])),
                                        staged=spool.take(b) if spool is not None else None)  # fmt: skip
            finally:
                recorder.sink = None
                if spool is not None:
                    spool.discard()  # what an error left uncommitted
            bar.update(sum(ex.id not in done for ex in batch))
    run = open_run(out)
    if shard is None:
        export_for_judge(dataset, run)  # a judged benchmark: its predictions where the judge reads them
    return run


class _ScoreSpool:
    """Where one batch's p̄ goes as it leaves the device (the recorder's sink,
    :class:`vpstudy.tracebuffer.TraceSink`): each chunk's rows are appended to their samples'
    staged ``scores`` arrays (:meth:`vpstudy.runs.RunWriter.stage`), [steps, score layers, N_v]
    float16. Rows of samples already in the run (a resumed batch) are dropped."""

    def __init__(self, writer: RunWriter, sample_ids: Sequence[str], skip: Any) -> None:
        self.writer, self.sample_ids, self.skip = writer, list(sample_ids), skip
        self.staged: dict[int, StagedSample] = {}

    def __call__(self, chunk: TraceChunk) -> None:
        for b, sample_id in enumerate(self.sample_ids):
            if sample_id in self.skip:
                continue
            if b not in self.staged:
                self.staged[b] = self.writer.stage(sample_id)
            n, steps = int(chunk.n_visual[b]), int(chunk.valid[b])
            appender = self.staged[b].appender("scores", SCORE_DTYPE, (chunk.scores.shape[2], n))
            if steps:
                appender.append(chunk.scores[b, :steps, :, :n])

    def take(self, b: int) -> StagedSample | None:
        """Row ``b``'s staged arrays, for :meth:`~vpstudy.runs.RunWriter.write_sample` to commit."""
        return self.staged.pop(b, None)

    def discard(self) -> None:
        """Remove what was staged and not taken."""
        for staged in self.staged.values():
            staged.discard()
        self.staged.clear()


def _estimate(model: Any, recorder: Recorder, input_ids: torch.Tensor, settings: RecordSettings) -> str:
    """The line :func:`record_dataset` prints before its first generation: a sample's size on disk
    at ``max_new_tokens`` steps, with N_v the largest of the first batch, and the recorder's peak
    memory for a full batch (:func:`vpstudy.storage.estimate`)."""
    n_visual = int(recorder.spec.visual_mask(input_ids, model.config).sum(-1).max())
    est = estimate(policy=settings.store.policy, layers=len(recorder.layers), score_layers=len(recorder.score_layers),
                   n_visual=n_visual, steps=settings.max_new_tokens, thresholds=len(recorder.thresholds),
                   temperatures=len(recorder.temperatures), chunk_steps=settings.store.chunk_steps,
                   batch=settings.batch_size)  # fmt: skip
    return estimate_line(est, recorder.score_layers, recorder.layers, device=str(input_ids.device),
                         batch=settings.batch_size, chunk_steps=settings.store.chunk_steps)  # fmt: skip


def _sampler(settings: RecordSettings, batch: Sequence[Example]) -> dict[str, Any]:
    """``generate`` keyword arguments for a sampled batch: a logits processor drawing each row
    from the stream of its sample id (:mod:`vpstudy.sampling`); none for greedy decoding."""
    if settings.sampling is None:
        return {}
    from transformers import LogitsProcessorList

    seeds = [sample_seed(settings.seed, ex.id) for ex in batch]
    return {"logits_processor": LogitsProcessorList([settings.sampling.processor(seeds)])}


def _record_sharded(model: Any, processor: Any, dataset: VisionDataset, out: str | Path, settings: RecordSettings,
                    info: Launch, **kwargs: Any) -> Run:  # fmt: skip
    """:func:`record_dataset` as one rank of a launch: record this rank's batches into its shard,
    then (rank 0) merge every shard into ``out`` in the single-process order; every rank returns
    the merged run once it is on disk (:func:`vpstudy.distributed.run_sharded`)."""
    ids = [ex.id for ex in run_examples(dataset, settings.repeats)]

    def record(shard: Shard) -> None:
        record_dataset(model, processor, dataset, shard.path, settings, shard=shard, **kwargs)

    def merge(paths: list[Path]) -> Run:
        run = merge_runs(out, paths, order=ids, compare_keys=RESUME_KEYS)
        export_for_judge(dataset, run)
        return run

    run_sharded(out, info, ids, settings.batch_size, record, merge)
    return open_run(out)


def store_manifest(store: StorePolicy, score_layers: list[int], out: str | Path) -> dict[str, Any]:
    """The manifest's ``store`` entry for a run in ``out``: the policy and its score layers; none
    for ``full`` into a run written before store policies (which kept every layer's p̄), so that it
    resumes as it is."""
    stored = peek_manifest(out)
    if store.policy == "full" and stored is not None and "store" not in stored:
        return {}
    return {"store": {"policy": store.policy, "score_layers": list(score_layers)}}


def check_resumable(out: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse, before anything is written, to add to the run in ``out`` (if there is one) with
    settings that differ from its own in :data:`RESUME_KEYS` (what :class:`RunWriter` refuses).

    Raises:
        RunStoreError: one line naming the run and every differing key.
    """
    stored = peek_manifest(out)
    if stored is None:
        return
    requested = json.loads(json.dumps(manifest, default=str))
    diffs = [f"{k} (stored {json.dumps(stored.get(k))}, requested {json.dumps(requested.get(k))})"
             for k in RESUME_KEYS if stored.get(k) != requested.get(k)]  # fmt: skip
    if diffs:
        raise RunStoreError(f"{out}: existing run was recorded with different {', '.join(diffs)}; use a new --out "
                            "directory")  # fmt: skip


def build_pruner(model: Any, plan: PruningPlan, seed: int) -> Pruner:
    """The pruner :func:`record_dataset` installs for ``plan`` (mask mode, under the recorder).
    Building it checks the plan's methods against the model (anchor layers, a fitted rule's model
    and layer) without touching the model, so callers can validate plans before writing."""
    return Pruner(model, plan.methods, mode="mask", seed=seed)


def check_same_dataset(out: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse to resume a run in ``out`` with a dataset other than the one it was recorded from.

    Compares the dataset fingerprints (:meth:`vpstudy.datasets.VisionDataset.fingerprint`: every
    record of the source, whatever ``--limit`` loaded, so a prefix of the same dataset resumes).
    A run without a fingerprint (recorded before vpstudy stored one) is not checked.

    Raises:
        RunStoreError: one line naming both datasets; nothing is written.
    """
    stored = peek_manifest(out)
    difference = dataset_difference(stored, manifest.get("dataset") or {}) if stored is not None else None
    if difference:
        raise RunStoreError(f"{out}: this run was recorded from {difference}; pass the same --data to resume it, or a "
                            "new --out directory")  # fmt: skip


def dataset_difference(manifest: dict[str, Any], dataset: dict[str, Any]) -> str | None:
    """``"dataset A (n records, sha256 …), not B (…)"`` when the run of ``manifest`` was recorded from
    another dataset than ``dataset`` (a manifest's ``dataset`` entry); None when they are the same
    or either has no fingerprint."""
    before = manifest.get("dataset")
    if not isinstance(before, dict):
        before = {}
    old, new = before.get("fingerprint"), dataset.get("fingerprint")
    if not isinstance(old, dict) or not isinstance(new, dict) or old.get("sha256") == new.get("sha256"):
        return None
    return (f"dataset {before.get('path')} ({old.get('records')} records, sha256 {str(old.get('sha256'))[:12]}), not "
            f"{dataset.get('path')} ({new.get('records')} records, sha256 {str(new.get('sha256'))[:12]})")


def _warn_past_positions(model: Any, prompt_tokens: int, max_new_tokens: int, example: Example) -> bool:
    """Warn (once, in one line) when a prompt plus ``max_new_tokens`` runs past the text model's
    ``max_position_embeddings``. Rotary position models still decode there, so it is a warning,
    not an error; the tokens past the limit are outside what the model was trained on. Returns
    whether it warned."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or prompt_tokens + max_new_tokens <= limit:
        return False
    warnings.warn(VpstudyWarning(
        f"{example.source}: prompt of {prompt_tokens} tokens + --max-new-tokens {max_new_tokens} = "
        f"{prompt_tokens + max_new_tokens} positions, past the model's max_position_embeddings {limit}; tokens "
        f"after position {limit} may be garbage (lower --max-new-tokens to {max(1, limit - prompt_tokens)} "
        "to stay within it)"), stacklevel=3)  # fmt: skip
    return True


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
    scored = samples["correct"].dropna() if "correct" in samples else None
    if scored is not None and len(scored):
        parts.append(f"exact match {float(np.mean(scored.astype(bool))):.1%}")
    return f"{run.path}: " + ", ".join(parts)

