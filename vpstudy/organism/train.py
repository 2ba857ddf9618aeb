"""``vpstudy train-organism``: train an organism from scratch on CPU, reproducibly.

Every step draws a fresh batch of examples from :mod:`vpstudy.organism.tasks` (a generator
seeded once from ``seed``), builds the inputs with the same processor and prompt format that
:func:`vpstudy.load` and ``vpstudy record`` use, and minimises cross-entropy on the trace tokens
and the closing EOS only (the prompt and image are context). AdamW, linear warm-up then cosine
decay to 10% of the peak rate. Every ``eval_every`` steps a fixed validation set (drawn from a
seed no training batch uses) is decoded greedily and scored.

**Patch probe** (``probe_weight``, default 1): a linear probe on the per-visual-token features
(LLaVA's projector output, Qwen2-VL's merger output) is trained alongside to predict each
token's cell content (empty, or colour × shape) and which of the 16 cells it lies in; the sum of
the two cross-entropies, times ``probe_weight``, is added to the loss. It is a training-only aid
for the vision tower (the probe is not saved) and puts no pressure on where the text model
attends. Without it (``--probe-weight 0``) the LLaVA organism learns to list the cells of a
colour but not to read the content of a named cell: its validation answer accuracy stayed at
0.73–0.81 (lookup questions 0.43–0.64) from step 2,000 to 3,750; see ``data/README.md``.

The log ``train_log.csv`` (next to the weights) has one row per step: ``step, loss, token_acc,
probe_loss, lr, elapsed_s`` and, on evaluation steps, ``val_answer_acc, val_trace_acc`` and the
answer accuracy per question type. With the same settings (seed and thread count included) on
the same machine the ``loss`` column is identical run to run (torch's CPU kernels are
deterministic at a fixed thread count; wall times of course differ).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..scoring import final_answer
from ..families import get_family
from ..loading import quiet_transformers
from ..processing import format_prompt, prepare_batch, tokenizer_of
from ..provenance import package_versions
from ..testing import BOS, EOS, PAD
from .model import VISUAL_FEATURES, Architecture, OrganismError, Parts, build_parts, check_family, default_architecture
from .tasks import (GRID, N_CONTENT_CLASSES, QUESTION_TYPES, Example, content_classes, generate, generate_one,
                    token_cell_index)  # fmt: skip

VALIDATION_SEED_OFFSET = 1_000_003  # validation examples come from seed + this (never a training seed)
LOG_COLUMNS = ("step", "loss", "token_acc", "probe_loss", "lr", "elapsed_s", "val_answer_acc", "val_trace_acc",
               *(f"val_answer_acc_{q}" for q in QUESTION_TYPES))  # fmt: skip
MANIFEST = "organism.json"


@dataclass
class TrainSettings:
    """How an organism is trained. Equal settings and seed reproduce the same loss curve."""

    family: str = "llava"
    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    eval_every: int = 250
    eval_size: int = 128
    threads: int = 1  # part of what makes the loss curve reproducible
    probe_weight: float = 1.0
    qtypes: tuple[str, ...] = QUESTION_TYPES
    arch: Architecture | None = None  # None: the shipped organism's (model.default_architecture)

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = default_architecture(self.family)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["qtypes"] = list(self.qtypes)
        return out

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> TrainSettings:
        """Inverse of :meth:`to_json` (e.g. the ``settings`` of an ``organism.json``)."""
        return cls(**{**fields, "qtypes": tuple(fields["qtypes"]), "arch": Architecture(**fields["arch"])})


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def training_batch(parts_processor: Any, model: Any, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Inputs and labels for teacher forcing: prompt + trace + EOS, loss on trace and EOS only."""
    spec = model.vpstudy_family
    tokenizer = tokenizer_of(parts_processor)
    texts = [format_prompt(parts_processor, spec, ex.question) + " " + " ".join(ex.trace) + " " + tokenizer.eos_token
             for ex in examples]  # fmt: skip
    inputs = prepare_batch(parts_processor, spec, model.config, texts, [ex.scene.render() for ex in examples])
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, ex in enumerate(examples):
        n = len(ex.trace) + 1
        labels[row, -n:] = inputs["input_ids"][row, -n:]
    inputs["labels"] = labels
    return dict(inputs)


@torch.no_grad()
def evaluate_examples(model: Any, processor: Any, examples: list[Example], batch_size: int = 64,
                      max_new_tokens: int = 40) -> dict[str, float]:  # fmt: skip
    """Greedy decoding: final-answer exact match and whole-trace exact match rates, overall and
    (``answer_acc_<qtype>``) per question type."""
    spec = model.vpstudy_family
    tokenizer = tokenizer_of(processor)
    answer_hits = trace_hits = 0
    by_type: dict[str, list[bool]] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [format_prompt(processor, spec, ex.question) for ex in chunk]
        inputs = prepare_batch(processor, spec, model.config, prompts, [ex.scene.render() for ex in chunk])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for ex, text in zip(chunk, texts, strict=True):
            hit = final_answer(text).split() == ex.answer.split()
            answer_hits += hit
            trace_hits += text.split() == ex.trace
            by_type.setdefault(ex.qtype, []).append(hit)
    model.train(was_training)
    result = {"answer_acc": answer_hits / len(examples), "trace_acc": trace_hits / len(examples)}
    return result | {f"answer_acc_{k}": sum(v) / len(v) for k, v in sorted(by_type.items())}


def check_output_dir(out: Path, settings: TrainSettings, overwrite: bool) -> None:
    """Refuse an output directory that holds something other than this organism."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OrganismError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()) or overwrite:
        return
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text()).get("settings")
        except (json.JSONDecodeError, AttributeError):
            previous = None
        if previous == settings.to_json():
            return  # same settings: retraining reproduces it
        raise OrganismError(f"{out}: holds an organism trained with other settings; pass --overwrite to replace it")
    raise OrganismError(f"{out}: directory is not empty and holds no organism; pass --overwrite to replace it")


@dataclass
class _Trainer:
    """A model being trained, with its optimiser, schedule and data stream."""

    settings: TrainSettings
    parts: Parts
    model: Any
    optimizer: Any
    schedule: Any
    rng: np.random.Generator
    probe: torch.nn.Linear | None = None
    cell_of_token: torch.Tensor = field(default_factory=lambda: torch.from_numpy(token_cell_index()))

    @classmethod
    def fresh(cls, settings: TrainSettings) -> _Trainer:
        """Weights, optimiser and data stream initialised from ``settings.seed``."""
        from transformers import AutoModelForImageTextToText

        parts = build_parts(settings.family, settings.arch)
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        with quiet_transformers():
            model = AutoModelForImageTextToText.from_config(parts.config, attn_implementation="sdpa")
        model.vpstudy_family = get_family(settings.family)
        for key, value in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
            setattr(model.generation_config, key, value)
        model.train()
        probe = None
        params = list(model.parameters())
        if settings.probe_weight > 0:
            probe = torch.nn.Linear(settings.arch.text_hidden, N_CONTENT_CLASSES + GRID * GRID)
            params += list(probe.parameters())
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
        return cls(settings, parts, model, optimizer, schedule, np.random.default_rng(settings.seed), probe)

    def steps(self) -> Iterator[dict[str, float]]:
        """Run the optimiser steps one by one, yielding ``step, loss, token_acc, lr`` of each."""
        settings, model = self.settings, self.model
        features: list[torch.Tensor] = []
        hook = None
        if self.probe is not None:
            module = model.get_submodule(VISUAL_FEATURES[settings.family])
            hook = module.register_forward_hook(lambda _m, _i, out: features.append(out))
        try:
            yield from self._steps(features)
        finally:
            if hook is not None:
                hook.remove()

    def _steps(self, features: list[torch.Tensor]) -> Iterator[dict[str, float]]:
        settings, model = self.settings, self.model
        for step in range(settings.steps):
            examples = [generate_one(self.rng, settings.qtypes) for _ in range(settings.batch_size)]
            batch = training_batch(self.parts.processor, model, examples)
            features.clear()
            output = model(**batch)
            loss, probe_loss = output.loss, float("nan")
            if self.probe is not None:
                visual = features[-1].reshape(len(examples), -1, settings.arch.text_hidden)
                content = torch.from_numpy(np.stack([content_classes(ex.scene) for ex in examples])).flatten()
                logits = self.probe(visual).flatten(0, 1)  # [B * 64, content classes + cells]
                cells = self.cell_of_token.repeat(len(examples))
                probe_term = (torch.nn.functional.cross_entropy(logits[:, :N_CONTENT_CLASSES], content)
                              + torch.nn.functional.cross_entropy(logits[:, N_CONTENT_CLASSES:], cells))  # fmt: skip
                loss = loss + settings.probe_weight * probe_term
                probe_loss = probe_term.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], 1.0)
            self.optimizer.step()
            lr = self.schedule.get_last_lr()[0]
            self.schedule.step()
            with torch.no_grad():
                target = batch["labels"][:, 1:]
                hit = (output.logits[:, :-1].argmax(-1) == target) & (target != -100)
                token_acc = hit.sum().item() / (target != -100).sum().item()
            yield {"step": step + 1, "loss": output.loss.item(), "token_acc": token_acc, "probe_loss": probe_loss, "lr": lr}


def training_curve(settings: TrainSettings, n_steps: int) -> list[float]:
    """The losses of the first ``n_steps`` steps of a run with ``settings`` (nothing is saved)."""
    trainer = _Trainer.fresh(settings)
    return [row["loss"] for row, _ in zip(trainer.steps(), range(n_steps), strict=False)]


def train_command(settings: TrainSettings, out: str | Path) -> str:
    """The ``vpstudy train-organism`` command line that reproduces ``settings``."""
    default, arch = TrainSettings(family=settings.family), default_architecture(settings.family)
    flags = [f"--family {settings.family}", f"--out {out}", f"--seed {settings.seed}"]
    for name in ("steps", "batch_size", "lr", "threads", "eval_every", "probe_weight"):
        if getattr(settings, name) != getattr(default, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(settings, name)}")
    for name in ("text_layers", "text_hidden"):
        if getattr(settings.arch, name) != getattr(arch, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(settings.arch, name)}")
    return "vpstudy train-organism " + " ".join(flags)


def train(settings: TrainSettings, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train an organism and save it to ``out`` (``save_pretrained`` form + log + manifest).

    The output directory is written only when training has finished: everything goes to a hidden
    sibling staging directory that is moved into place at the end, so an interrupted or failed
    run leaves ``out`` as it was.

    Returns:
        The manifest written to ``out/organism.json`` (settings, command, wall time, machine,
        final validation accuracy, versions).
    """
    out = Path(out)
    check_family(settings.family)  # before anything else
    check_output_dir(out, settings, overwrite)
    staging = out.parent / f".{out.name}.training"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _train_into(staging, settings, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest["command"] = train_command(settings, out)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def _train_into(staging: Path, settings: TrainSettings, progress: bool) -> dict[str, Any]:
    """Train from scratch; write the log, weights and processors into ``staging``."""
    from tqdm.auto import tqdm

    trainer = _Trainer.fresh(settings)
    validation = generate(settings.eval_size, settings.seed + VALIDATION_SEED_OFFSET, settings.qtypes)
    start = time.perf_counter()
    last_eval: dict[str, float] = {}
    with (staging / "train_log.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        bar = tqdm(trainer.steps(), total=settings.steps, desc=f"train {settings.family} organism", disable=not progress)
        for stats in bar:
            step = stats["step"]
            row: dict[str, Any] = {"step": step, "loss": f"{stats['loss']:.6f}", "token_acc": f"{stats['token_acc']:.4f}",
                                   "probe_loss": f"{stats['probe_loss']:.4f}",
                                   "lr": f"{stats['lr']:.3e}", "elapsed_s": f"{time.perf_counter() - start:.1f}"}  # fmt: skip
            if step % settings.eval_every == 0 or step == settings.steps:
                last_eval = evaluate_examples(trainer.model, trainer.parts.processor, validation)
                row.update({f"val_{k}": f"{v:.4f}" for k, v in last_eval.items()})
            writer.writerow(row)
            handle.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{last_eval.get('answer_acc', float('nan')):.3f}")
    wall = time.perf_counter() - start

    model, parts = trainer.model.eval(), trainer.parts
    with quiet_transformers():
        model.save_pretrained(staging)
    parts.tokenizer.save_pretrained(staging)
    parts.image_processor.save_pretrained(staging)
    if parts.save_processor is not None:
        parts.save_processor().save_pretrained(staging)
    return {
        "family": settings.family,
        "settings": settings.to_json(),
        "wall_time_s": round(wall, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "threads": settings.threads},  # fmt: skip
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_validation": last_eval,
        "versions": package_versions(),
    }
