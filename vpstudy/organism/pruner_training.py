"""``vpstudy train-pruner``: train LearnPruner's pruning module on an organism, the VLM frozen.

The module (:class:`vpstudy.pruning.methods.learnpruner.PruningModule`, an MLP on each visual
feature entering the language model) gives every visual token a keep probability p. In each
training forward the straight-through hard mask ``m = hard + p − stop_gradient(p)`` keeps the R1
tokens of highest p in each image (R1 = clamp(floor(keep · N_v), 1, N_v), the stage-1 budget
LearnPruner keeps at inference), and enters the language model as an attention bias on the visual
keys, ``20 · (m − 1)`` (:func:`masked_attention`): the forward hides exactly the dropped tokens
from every query at every layer, as pruning does at inference, and the backward gives p the
gradient of the trace's cross-entropy through the attention the kept tokens receive. (Zeroing
the dropped features instead, an earlier reading, leaves zero-feature tokens in the sequence
that the frozen model never saw; its training loss rose.) Only the
module's weights are trained (AdamW); batches are drawn fresh from the organism's own task
generator every step (seeded), with the prompt and trace format of ``vpstudy train-organism``.

The module is saved beside the organism (``learnpruner.safetensors`` + ``learnpruner.json``
with the settings, the organism's config hash and the loss curve), where ``LearnPruner`` finds it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..loading import config_hash
from ..pruning.methods.learnpruner import MODULE_CONFIG, PruningModule
from ..rules import keep_count
from .model import OrganismError
from .tasks import TASKS, generate_one
from .train import training_batch


@dataclass(frozen=True)
class PrunerTrainSettings:
    """How the pruning module is trained.

    Attributes:
        keep: the share of visual tokens the hard mask keeps (LearnPruner's stage-1 budget;
            default 0.15 = R1 for a 5% final budget with R1 : R2 = 3).
        steps, batch_size, lr, hidden, seed, threads: the usual.
    """

    keep: float = 0.15
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4  # 2e-3 made the trace loss rise on v2 (1.09 -> 1.47); 5e-4 lowered it (0.82 -> 0.56)
    hidden: int = 64
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.keep < 1:
            raise OrganismError(f"--keep must be in (0, 1), got {self.keep}")
        for name in ("steps", "batch_size", "hidden", "threads"):
            if getattr(self, name) < 1:
                raise OrganismError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise OrganismError(f"--lr must be > 0, got {self.lr}")


HIDE = 20.0  # logit offset that hides a dropped visual key (its attention weight falls by e^-20)


def masked_attention(attention_mask: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The additive 4-D attention mask of a training forward that hides the visual keys not kept.

    Args:
        attention_mask: [B, T] 0/1 padding mask (left padding).
        visual: [B, T] bool, the visual positions (each row holds N of them).
        keep: [B, N] the straight-through mask (1 kept, 0 dropped in the forward; differentiable).

    Returns:
        [B, 1, T, T] float: 0 where a query may attend, a large negative value where the causal or
        padding mask forbids it, and ``HIDE · (keep − 1)`` on the visual keys (0 kept, −20 dropped),
        so that the gradient of the loss reaches ``keep`` through the attention the kept tokens get.
    """
    batch, length = attention_mask.shape
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None])[None] & attention_mask.bool()[:, None, :]
    base = torch.zeros(batch, length, length).masked_fill(~allowed, -1e9)
    bias = torch.zeros(batch, length, dtype=keep.dtype)
    bias = bias.masked_scatter(visual, HIDE * (keep - 1))
    return (base + bias[:, None, :]).unsqueeze(1)


def straight_through_top(p: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] hard top-``k`` mask of ``p`` in the forward, the identity of ``p`` in the backward."""
    hard = torch.zeros_like(p).scatter_(-1, p.topk(k, dim=-1).indices, 1.0)
    return hard + p - p.detach()


def organism_task(model_dir: Path) -> str:
    """The task version an organism was trained on (its ``organism.json``; v1 if absent)."""
    manifest = model_dir / "organism.json"
    if not manifest.is_file():
        raise OrganismError(f"{model_dir}: not an organism (no organism.json): the pruning module trains on its task")
    return json.loads(manifest.read_text(encoding="utf-8"))["settings"].get("task", "v1")


def train_pruner(
    model_dir: str | Path,
    settings: PrunerTrainSettings = PrunerTrainSettings(),
    *,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the pruning module on the organism in ``model_dir`` and save it to ``out`` (default:
    beside the organism). Returns what was written to ``learnpruner.json``."""
    from tqdm.auto import tqdm

    from ..loading import load

    model_dir = Path(model_dir)
    task = organism_task(model_dir)
    out = Path(out) if out is not None else model_dir
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    model, processor = load(model_dir)
    if model.vpstudy_family.name != "llava":
        raise OrganismError(
            f"{model_dir}: train-pruner supports the LLaVA organism (features [B, N, D]), not "
            f"{model.vpstudy_family.name}"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    model.set_attn_implementation({"text_config": "eager"})  # the mask carries a gradient: plain softmax attention
    dim = model.config.get_text_config().hidden_size
    module = PruningModule(dim, settings.hidden)
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr)
    rng = np.random.default_rng(settings.seed)
    image_token = model.config.image_token_id
    curve = []
    start = time.perf_counter()
    for _ in tqdm(range(settings.steps), desc="train pruning module", disable=not progress):
        examples = [generate_one(rng, TASKS[task]) for _ in range(settings.batch_size)]
        batch = training_batch(processor, model, examples)
        batch.pop("text_only_rows")
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            features = torch.stack(list(features))  # [B, N, D]
        p = module(features).softmax(-1)[..., 1]
        keep = straight_through_top(p, int(keep_count(settings.keep, features.shape[1])))
        visual = batch["input_ids"] == image_token
        mask = masked_attention(batch["attention_mask"], visual, keep)
        loss = model(**{**batch, "attention_mask": mask}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 6))
    record = {
        "settings": asdict(settings),
        "organism": str(model_dir),
        "organism_config_hash": config_hash(model.config),
        "task": task,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "loss": curve,
        "trained_on": "the organism's task generator, VLM frozen, straight-through top-R1 mask",
    }
    module.save(out, **record)
    return json.loads((out / MODULE_CONFIG).read_text(encoding="utf-8"))
