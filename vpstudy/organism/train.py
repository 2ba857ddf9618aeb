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

from ..families import get_family
from ..loading import quiet_transformers
from ..processing import format_prompt, prepare_batch, tokenizer_of
from ..provenance import package_versions
from ..scoring import final_answer
from ..testing import BOS, EOS, PAD
from .lever import VisualMassLever
from .model import VISUAL_FEATURES, Architecture, OrganismError, Parts, build_parts, check_family, default_architecture
from .tasks import (
    GRID,
    N_CONTENT_CLASSES,
    QUESTION_TYPES,
    TASKS,
    Example,
    content_classes,
    generate,
    generate_one,
    token_cell_index,
)

VALIDATION_SEED_OFFSET = 1_000_003  # validation examples come from seed + this (never a training seed)
LOG_COLUMNS = (
    "step",
    "loss",
    "token_acc",
    "probe_loss",
    "lr",
    "elapsed_s",
    "val_answer_acc",
    "val_trace_acc",
    *(f"val_answer_acc_{q}" for q in QUESTION_TYPES),
)


def log_columns(settings: TrainSettings) -> tuple[str, ...]:
    """The columns of ``train_log.csv`` for ``settings`` (v1's are :data:`LOG_COLUMNS`)."""
    extra = ("text_mass",) if settings.text_mass_weight > 0 else ()
    per_type = tuple(f"val_answer_acc_{q}" for q in settings.qtypes)
    return (*LOG_COLUMNS[:4], *extra, *LOG_COLUMNS[4:8], *per_type)


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
    task: str = "v1"  # task version: its vocabulary and question types (tasks.TASKS)
    # weight of the training-only visual-mass lever: the mean visual attention mass (every text
    # layer and head) of the query rows that predict text-only trace tokens, added to the loss
    text_mass_weight: float = 0.0
    # warm start: an organism directory whose text model (embeddings of the shared vocabulary,
    # decoder layers, final norm, LM head) initialises this one's (see warm_start_text)
    init_from: str | None = None
    checkpoint_every: int = 250  # steps between resumable checkpoints in the staging directory

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = default_architecture(self.family)
        if self.task not in TASKS:
            raise OrganismError(f"unknown task version {self.task!r}; choose one of {', '.join(TASKS)}")
        unknown = sorted(set(self.qtypes) - set(TASKS[self.task]))
        if unknown:
            raise OrganismError(f"question types {unknown} are not part of task {self.task}")
        if self.text_mass_weight < 0:
            raise OrganismError(f"--text-mass-weight must be >= 0, got {self.text_mass_weight}")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON; the v2 fields only where they differ from v1 (so a v1 manifest
        written before they existed reads back equal)."""
        out = asdict(self)
        out["qtypes"] = list(self.qtypes)
        del out["checkpoint_every"]  # how often progress is saved does not change the result
        for name, v1 in (("task", "v1"), ("text_mass_weight", 0.0), ("init_from", None)):
            if out[name] == v1:
                del out[name]
        if out["arch"]["patch"] == Architecture.patch:
            del out["arch"]["patch"]
        return out

    @property
    def architecture(self) -> Architecture:
        """``arch``, which ``__post_init__`` sets (to the shipped organism's when none is given)."""
        if self.arch is None:
            raise OrganismError("training settings without an architecture (arch was set to None after construction)")
        return self.arch

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> TrainSettings:
        """Inverse of :meth:`to_json` (e.g. the ``settings`` of an ``organism.json``)."""
        return cls(**{**fields, "qtypes": tuple(fields["qtypes"]), "arch": Architecture(**fields["arch"])})


def new_layer_positions(source_layers: int, target_layers: int) -> list[int]:
    """Where a warm start puts the decoder layers it adds: spread evenly through the depth
    (8 from 6: positions 3 and 5)."""
    added = target_layers - source_layers
    return [round((k + 1) * target_layers / (added + 1)) for k in range(added)]


def warm_start_text(model: Any, source_dir: str | Path) -> dict[str, Any]:
    """Initialise ``model``'s text model from the organism in ``source_dir``.

    Copied: the token embeddings and LM-head rows of the source's vocabulary (the v2 vocabulary
    extends v1's, so ids agree), every decoder layer and the final norm. Where the target is
    deeper, the source's layers keep their order and the added layers
    (:func:`new_layer_positions`) keep their random initialisation except their two residual
    output projections (attention ``o_proj``, MLP ``down_proj``), set to zero: the warm-started
    model starts out computing exactly the source's text function, and the added layers learn
    from there. The vision tower and projector are not copied (the patch size differs).

    Returns:
        What was done: source, layer map (target index → source index or None), copied tensors.
    """
    from transformers import AutoModelForImageTextToText

    with quiet_transformers():
        source = AutoModelForImageTextToText.from_pretrained(source_dir)
    src_cfg, dst_cfg = source.config.get_text_config(), model.config.get_text_config()
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(src_cfg, name) != getattr(dst_cfg, name):
            raise OrganismError(
                f"--init-from {source_dir}: its text {name} is {getattr(src_cfg, name)}, "
                f"this organism's {getattr(dst_cfg, name)}"
            )
    n_src, n_dst = src_cfg.num_hidden_layers, dst_cfg.num_hidden_layers
    if n_dst < n_src:
        raise OrganismError(f"--init-from {source_dir}: it has {n_src} text layers, more than this organism's {n_dst}")
    added = set(new_layer_positions(n_src, n_dst))
    sources = iter(range(n_src))
    layer_map = {i: (None if i in added else next(sources)) for i in range(n_dst)}
    src_state, copied = source.state_dict(), 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "language_model." not in name and not name.startswith("lm_head."):
                continue
            parts = name.split(".")
            if "layers" in parts:
                at = parts.index("layers") + 1
                origin = layer_map[int(parts[at])]
                if origin is None:
                    if parts[-2] in ("o_proj", "down_proj"):
                        tensor.zero_()
                    continue
                parts[at] = str(origin)
            src = src_state[".".join(parts)]
            if src.shape == tensor.shape:
                tensor.copy_(src)
            else:  # embeddings / LM head: the source vocabulary is a prefix of this one
                tensor[: src.shape[0]].copy_(src)
            copied += 1
    return {"source": str(source_dir), "layer_map": layer_map, "copied_tensors": copied}


def v2_settings(family: str = "llava", **overrides: Any) -> TrainSettings:
    """The organism v2 recipe: 256 visual tokens (4-px patches), 8 text layers, the v2 task (text
    stretches that need the text) and the visual-mass lever on text-only tokens (data/README.md)."""
    arch = default_architecture(family, text_layers=8, patch=4)
    fields: dict[str, Any] = dict(
        family=family, arch=arch, task="v2", qtypes=TASKS["v2"], text_mass_weight=1.0, threads=2, steps=3000
    )
    fields.update(overrides)
    if "arch" not in overrides:
        fields["arch"] = arch
    return TrainSettings(**fields)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def training_batch(parts_processor: Any, model: Any, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Inputs and labels for teacher forcing: prompt + trace + EOS, loss on trace and EOS only.

    Also ``text_only_rows`` [B, T] bool: the query rows whose next token is a text-only trace
    token or the EOS (what the visual-mass lever acts on); pop it before calling the model."""
    spec = model.vpstudy_family
    tokenizer = tokenizer_of(parts_processor)
    texts = [
        format_prompt(parts_processor, spec, ex.question) + " " + " ".join(ex.trace) + " " + tokenizer.eos_token
        for ex in examples
    ]
    inputs = prepare_batch(parts_processor, spec, model.config, texts, [ex.scene.render() for ex in examples])
    labels = torch.full_like(inputs["input_ids"], -100)
    text_rows = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.trace) + 1
        labels[row, -n:] = inputs["input_ids"][row, -n:]
        predicts_text = torch.tensor([not reads for reads in ex.reads_image] + [True])  # + the EOS
        text_rows[row, -n - 1 : -1] = predicts_text
    inputs["labels"] = labels
    inputs["text_only_rows"] = text_rows
    return dict(inputs)


@torch.no_grad()
def evaluate_examples(
    model: Any, processor: Any, examples: list[Example], batch_size: int = 64, max_new_tokens: int = 40
) -> dict[str, float]:
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
    step: int = 0  # optimiser steps taken
    warm_start: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.cell_of_token = torch.from_numpy(token_cell_index(self.settings.architecture.tokens_per_side))

    @classmethod
    def fresh(cls, settings: TrainSettings) -> _Trainer:
        """Weights, optimiser and data stream initialised from ``settings.seed``."""
        from transformers import AutoModelForImageTextToText

        parts = build_parts(settings.family, settings.arch, settings.task)
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
            probe = torch.nn.Linear(settings.architecture.text_hidden, N_CONTENT_CLASSES + GRID * GRID)
            params += list(probe.parameters())
        warm = warm_start_text(model, settings.init_from) if settings.init_from else None
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
        trainer = cls(settings, parts, model, optimizer, schedule, np.random.default_rng(settings.seed), probe)
        trainer.warm_start = warm
        return trainer

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        """Everything a resumed run needs to continue exactly (written atomically)."""
        state = {
            "settings": self.settings.to_json(),
            "step": self.step,
            "model": self.model.state_dict(),
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "warm_start": self.warm_start,
            **extra,
        }
        partial = path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(path)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Continue from :meth:`save_checkpoint`'s file; returns it (for the caller's extras)."""
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step, self.warm_start = state["step"], state["warm_start"]
        return state

    def steps(self) -> Iterator[dict[str, float]]:
        """Run the optimiser steps one by one, yielding ``step, loss, token_acc, lr`` of each."""
        settings, model = self.settings, self.model
        features: list[torch.Tensor] = []
        hook = None
        if self.probe is not None:
            module = model.get_submodule(VISUAL_FEATURES[settings.family])
            hook = module.register_forward_hook(lambda _m, _i, out: features.append(out))
        try:
            if settings.text_mass_weight > 0:
                with VisualMassLever(model) as lever:
                    yield from self._steps(features, lever)
            else:
                yield from self._steps(features, None)
        finally:
            if hook is not None:
                hook.remove()

    def _steps(self, features: list[torch.Tensor], lever: VisualMassLever | None) -> Iterator[dict[str, float]]:
        settings, model = self.settings, self.model
        while self.step < settings.steps:
            step = self.step
            examples = [generate_one(self.rng, settings.qtypes) for _ in range(settings.batch_size)]
            batch = training_batch(self.parts.processor, model, examples)
            text_rows = batch.pop("text_only_rows")
            features.clear()
            if lever is not None:
                lever.select(text_rows, batch["input_ids"] == model.config.image_token_id, batch["attention_mask"])
            output = model(**batch)
            loss, probe_loss, text_mass = output.loss, float("nan"), float("nan")
            if lever is not None:
                mass = lever.mass()
                loss = loss + settings.text_mass_weight * mass
                text_mass = mass.item()
            if self.probe is not None:
                visual = features[-1].reshape(len(examples), -1, settings.architecture.text_hidden)
                tps = settings.architecture.tokens_per_side
                content = torch.from_numpy(np.stack([content_classes(ex.scene, tps) for ex in examples])).flatten()
                logits = self.probe(visual).flatten(0, 1)  # [B * 64, content classes + cells]
                cells = self.cell_of_token.repeat(len(examples))
                probe_term = torch.nn.functional.cross_entropy(
                    logits[:, :N_CONTENT_CLASSES], content
                ) + torch.nn.functional.cross_entropy(logits[:, N_CONTENT_CLASSES:], cells)
                loss = loss + settings.probe_weight * probe_term
                probe_loss = probe_term.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], 1.0)
            self.optimizer.step()
            lr = self.schedule.get_last_lr()[0]
            self.schedule.step()
            self.step += 1
            with torch.no_grad():
                target = batch["labels"][:, 1:]
                hit = (output.logits[:, :-1].argmax(-1) == target) & (target != -100)
                token_acc = hit.sum().item() / (target != -100).sum().item()
            yield {
                "step": step + 1,
                "loss": output.loss.item(),
                "token_acc": token_acc,
                "probe_loss": probe_loss,
                "text_mass": text_mass,
                "lr": lr,
            }


def training_curve(settings: TrainSettings, n_steps: int) -> list[float]:
    """The losses of the first ``n_steps`` steps of a run with ``settings`` (nothing is saved)."""
    trainer = _Trainer.fresh(settings)
    return [row["loss"] for row, _ in zip(trainer.steps(), range(n_steps), strict=False)]


RECIPES = ("v1", "v2")


def recipe_settings(recipe: str, family: str = "llava", **overrides: Any) -> TrainSettings:
    """The settings of a recipe (``v1``: the first shipped organisms; ``v2``: :func:`v2_settings`)
    with ``overrides``."""
    if recipe == "v1":
        return TrainSettings(family=family, **overrides)
    if recipe == "v2":
        return v2_settings(family, **overrides)
    raise OrganismError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def recipe_of(settings: TrainSettings) -> str:
    """The recipe ``settings`` start from (the task version names it)."""
    return settings.task


def train_command(settings: TrainSettings, out: str | Path) -> str:
    """The ``vpstudy train-organism`` command line that reproduces ``settings``."""
    recipe = recipe_of(settings)
    default = recipe_settings(recipe, settings.family)
    assert default.arch is not None and settings.arch is not None
    flags = [f"--family {settings.family}"] + ([f"--recipe {recipe}"] if recipe != "v1" else [])
    flags += [f"--out {out}", f"--seed {settings.seed}"]
    for name in ("steps", "batch_size", "lr", "threads", "eval_every", "probe_weight", "text_mass_weight", "init_from"):
        if getattr(settings, name) != getattr(default, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(settings, name)}")
    for name in ("text_layers", "text_hidden"):
        if getattr(settings.arch, name) != getattr(default.arch, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(settings.arch, name)}")
    return "vpstudy train-organism " + " ".join(flags)


def train(
    settings: TrainSettings, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train an organism and save it to ``out`` (``save_pretrained`` form + log + manifest).

    The output directory is written only when training has finished: everything goes to a hidden
    sibling staging directory (``.<out>.training``) that is moved into place at the end, so an
    interrupted or failed run leaves ``out`` as it was. The staging directory holds a checkpoint
    every ``settings.checkpoint_every`` steps; running the same command again resumes from it
    (same settings only) and continues exactly where it stopped.

    Returns:
        The manifest written to ``out/organism.json`` (settings, command, wall time, machine,
        final validation accuracy, versions).
    """
    out = Path(out)
    check_family(settings.family)  # before anything else
    check_output_dir(out, settings, overwrite)
    staging = out.parent / f".{out.name}.training"
    checkpoint = staging / CHECKPOINT
    if not _resumable(checkpoint, settings):
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _train_into(staging, settings, progress)
    except BaseException:
        if not checkpoint.is_file():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint.unlink(missing_ok=True)
    manifest["command"] = train_command(settings, out)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


CHECKPOINT = "checkpoint.pt"


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Settings equal except for the thread count (which changes float rounding, not the run)."""
    return {k: v for k, v in a.items() if k != "threads"} == {k: v for k, v in b.items() if k != "threads"}


def _resumable(checkpoint: Path, settings: TrainSettings) -> bool:
    """Whether ``checkpoint`` exists and was written by a run with these settings (the thread
    count may differ: a resumed run records each thread count it ran with)."""
    if not checkpoint.is_file():
        return False
    try:
        return _same_run(torch.load(checkpoint, weights_only=False, map_location="cpu")["settings"], settings.to_json())
    except Exception:  # unreadable (e.g. cut short): start over
        return False


def _train_into(staging: Path, settings: TrainSettings, progress: bool) -> dict[str, Any]:
    """Train (from the staging checkpoint if there is one); write the log, weights and processors."""
    from tqdm.auto import tqdm

    trainer = _Trainer.fresh(settings)
    validation = generate(settings.eval_size, settings.seed + VALIDATION_SEED_OFFSET, settings.qtypes)
    last_eval: dict[str, float] = {}
    log, checkpoint, done = staging / "train_log.csv", staging / CHECKPOINT, 0.0
    threads = [{"from_step": 1, "threads": settings.threads}]
    if checkpoint.is_file():
        state = trainer.load_checkpoint(checkpoint)
        last_eval, done = state["last_eval"], state["elapsed_s"]
        threads = state.get("threads", [{"from_step": 1, "threads": state["settings"]["threads"]}])
        if threads[-1]["threads"] != settings.threads:
            threads.append({"from_step": trainer.step + 1, "threads": settings.threads})
        with log.open() as handle:  # keep the log up to the checkpoint
            kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= trainer.step]
        _write_log(log, settings, kept)
    else:
        _write_log(log, settings, [])
    start = time.perf_counter() - done
    with log.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=log_columns(settings), lineterminator="\n")
        bar = tqdm(
            trainer.steps(),
            total=settings.steps,
            initial=trainer.step,
            desc=f"train {settings.family} organism",
            disable=not progress,
        )
        for stats in bar:
            step = stats["step"]
            row: dict[str, Any] = {
                "step": step,
                "loss": f"{stats['loss']:.6f}",
                "token_acc": f"{stats['token_acc']:.4f}",
                "probe_loss": f"{stats['probe_loss']:.4f}",
                "lr": f"{stats['lr']:.3e}",
                "elapsed_s": f"{time.perf_counter() - start:.1f}",
            }
            if settings.text_mass_weight > 0:
                row["text_mass"] = f"{stats['text_mass']:.4f}"
            if step % settings.eval_every == 0 or step == settings.steps:
                last_eval = evaluate_examples(trainer.model, trainer.parts.processor, validation)
                row.update({f"val_{k}": f"{v:.4f}" for k, v in last_eval.items()})
            writer.writerow(row)
            handle.flush()
            if step % settings.checkpoint_every == 0 and step < settings.steps:
                trainer.save_checkpoint(
                    checkpoint, {"last_eval": last_eval, "elapsed_s": time.perf_counter() - start, "threads": threads}
                )
            bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{last_eval.get('answer_acc', float('nan')):.3f}")
    wall = time.perf_counter() - start

    model, parts = trainer.model.eval(), trainer.parts
    with quiet_transformers():
        model.save_pretrained(staging)
    parts.tokenizer.save_pretrained(staging)
    parts.image_processor.save_pretrained(staging)
    if parts.save_processor is not None:
        parts.save_processor().save_pretrained(staging)
    manifest = {
        "family": settings.family,
        "settings": settings.to_json(),
        "wall_time_s": round(wall, 1),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": settings.threads,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_validation": last_eval,
        "versions": package_versions(),
    }
    if len(threads) > 1:  # resumed with another thread count: the loss column is not bit-reproducible
        manifest["threads_by_step"] = threads
    if trainer.warm_start is not None:
        manifest["warm_start"] = {
            **trainer.warm_start,
            "layer_map": {str(k): v for k, v in trainer.warm_start["layer_map"].items()},
        }
    return manifest


def _write_log(path: Path, settings: TrainSettings, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=log_columns(settings), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
