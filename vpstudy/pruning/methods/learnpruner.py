"""LearnPruner (ICLR 2026): a learned pruning module after the vision encoder (stage 1, with
diversity tokens), then text-to-vision attention at a middle layer (stage 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...families import ENCODER_FAMILIES
from ...rules import keep_count
from ..registry import Entry, pct, ratio_entry, register
from .base import (
    Decision,
    EncoderContext,
    FeatureSelection,
    MethodUnavailable,
    PruningError,
    PruningMethod,
    Stage,
    check_ratio,
)

MODULE_WEIGHTS = "learnpruner.safetensors"
MODULE_CONFIG = "learnpruner.json"


class PruningModule(torch.nn.Module):
    """The learnable pruning module (LPM): an MLP classifying each visual token as keep / drop.

    ``forward(features [N, D]) -> logits [N, 2]``; softmax(logits)[:, 1] is the keep probability,
    the token's importance at inference.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 2))

    @override
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def importance(self, features: torch.Tensor) -> torch.Tensor:
        """[N] keep probability of each token."""
        return self.forward(features.float()).softmax(-1)[..., 1]

    def save(self, directory: str | Path, **provenance: Any) -> Path:
        """Write ``learnpruner.safetensors`` and ``learnpruner.json`` (sizes + ``provenance``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / MODULE_WEIGHTS))
        config = {"dim": self.dim, "hidden": self.hidden, **provenance}
        (directory / MODULE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory / MODULE_WEIGHTS

    @classmethod
    def load(cls, directory: str | Path) -> PruningModule:
        """Read a module written by :meth:`save` (one-line error if there is none)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / MODULE_CONFIG).read_text(encoding="utf-8"))
            state = load_file(str(directory / MODULE_WEIGHTS))
        except FileNotFoundError:
            raise MethodUnavailable(
                f"learnpruner: no trained pruning module in {directory} "
                f"(expected {MODULE_WEIGHTS} and {MODULE_CONFIG}; train one with vpstudy train-pruner)"
            ) from None
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise PruningError(f"learnpruner: {directory}: the pruning module cannot be read ({e})") from None
        module = cls(int(config["dim"]), int(config["hidden"]))
        module.load_state_dict(state)
        return module.eval()


def max_min_diverse(features: torch.Tensor, chosen: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity: repeatedly add the candidate whose largest cosine similarity to
    the chosen set is smallest (ties to the lower index), ``count`` times.

    Args:
        features: [N, D] token features (compared by cosine similarity).
        chosen: [C] long, indices of the tokens already kept (may be empty).
        candidates: [M] long, indices of the tokens to choose from.
        count: how many to add (at most ``M``).

    Returns:
        [min(count, M)] long, the added indices in the order they were picked.
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    pool = candidates.clone()
    picked: list[int] = []
    nearest = (x[pool] @ x[chosen].T).amax(-1) if len(chosen) else torch.full((len(pool),), -1.0)
    for _ in range(min(count, len(pool))):
        j = int(torch.argmin(nearest))
        token = int(pool[j])
        picked.append(token)
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[j] = False
        pool, nearest = pool[keep], nearest[keep]
        if len(pool):
            nearest = torch.maximum(nearest, x[pool] @ x[token])
    return torch.tensor(picked, dtype=torch.long)


@register
@dataclass
class LearnPruner(PruningMethod):
    """LearnPruner (Takezoe et al., ICLR 2026), two stages.

    Stage 1, after the vision encoder: a learned MLP (:class:`PruningModule`, trained with the VLM
    frozen by ``vpstudy train-pruner``) scores every visual token; the R1 − D best are kept plus D =
    round(diversity · R1) *diversity tokens* chosen by greedy max-min cosine distance among the
    rest (the paper's λ = 10%, read as a share of the stage-1 budget). Stage 2, at the prefill:
    at layer ``layer`` (default the paper's 12 of 32 at the same relative depth) each remaining
    visual token is scored by the attention the prompt's text rows after the image pay it
    (head mean, mean over those rows), and the top R2 are kept from the next layer on, for the
    prompt and every generated token. Budgets: R2 = clamp(floor(ratio · N_v), 1, N_v) and
    R1 = min(N_v, split · R2) with the paper's R1 : R2 = 3.

    Deviations: the module reads the features entering the language model (after the projector),
    the paper's reads the encoder output; tokens keep their positions (dropped ones are hidden
    from every text layer). ``module`` is the directory holding the trained module (default: the
    model's own directory, where ``vpstudy train-pruner`` writes it beside the organism).
    """

    name: ClassVar[str] = "learnpruner"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"split": 0.5}, "learnpruner: split (R1 : R2) must be >= 1"),
    )
    step_wise: ClassVar[bool] = False
    acts_on_encoder: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...] | None] = ENCODER_FAMILIES
    query_rows: ClassVar[str] = "text"
    ratio: float = 0.05
    split: float = 3.0
    diversity: float = 0.1
    layer: int | None = None
    module: str | None = None
    _module: PruningModule | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio("learnpruner: ratio", self.ratio)
        if not self.split >= 1:
            raise PruningError(f"learnpruner: split (R1 : R2) must be >= 1, got {self.split}")
        if not 0 <= self.diversity < 1:
            raise PruningError(f"learnpruner: diversity must be in [0, 1), got {self.diversity}")

    def budgets(self, n: int) -> tuple[int, int]:
        """(R1, R2) for an image of ``n`` tokens."""
        r2 = int(keep_count(self.ratio, n))
        return min(n, int(round(self.split * r2))), r2

    def middle_layer(self, n_layers: int) -> int:
        """The stage-2 layer of an ``n_layers``-layer model: ``layer``, else 12 of 32 at the same relative depth."""
        return self.layer if self.layer is not None else min(n_layers - 2, max(0, round(12 / 32 * n_layers)))

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        layer = self.middle_layer(n_layers)
        if not 0 <= layer < n_layers - 1:
            raise PruningError(f"learnpruner: layer {layer} out of range: needs 0..{n_layers - 2}")
        return [Stage(layer, layer + 1)]

    def bind(self, model_dir: str | Path | None) -> None:
        """Load the trained module (from ``module``, else ``model_dir``) unless nothing is pruned."""
        if self.ratio * self.split >= 1 or self._module is not None:
            return
        where = self.module or model_dir
        if where is None:
            raise PruningError("learnpruner: no trained pruning module given (set module=DIR)")
        self._module = PruningModule.load(where)

    @override
    def select_features(self, ctx: EncoderContext) -> FeatureSelection:
        n = ctx.features.shape[0]
        r1, _ = self.budgets(n)
        if r1 >= n:
            return FeatureSelection(torch.arange(n))
        if self._module is None:
            raise PruningError(
                "learnpruner: the pruning module is not loaded (Pruner binds it from the model directory)"
            )
        if self._module.dim != ctx.features.shape[-1]:
            raise PruningError(
                f"learnpruner: the module reads {self._module.dim}-wide features, this model's are "
                f"{ctx.features.shape[-1]}"
            )
        with torch.no_grad():
            importance = self._module.importance(ctx.features.cpu()).to(ctx.features.device)
        diverse = int(round(self.diversity * r1))
        order = torch.sort(importance, descending=True, stable=True).indices
        chosen = order[: r1 - diverse]
        extra = max_min_diverse(
            ctx.features.cpu(), chosen.cpu(), torch.sort(order[r1 - diverse :]).values.cpu(), diverse
        )
        kept = torch.sort(torch.cat([chosen.cpu(), extra])).values
        return FeatureSelection(kept.to(ctx.features.device), scores=importance)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        if d.text_probs is None or d.text_rows is None:
            raise PruningError("learnpruner: stage 2 needs the text rows' attention (query_rows = 'text')")
        rows = d.text_rows.to(d.text_probs.dtype)[:, None, :, None]  # [B, 1, Q, 1]
        score = (d.text_probs * rows).sum(2).mean(1) / rows.sum(2).mean(1).clamp(min=1)  # [B, N]
        counts = torch.stack([torch.tensor(self.budgets(int(n))[1]) for n in d.n_visual]).to(d.n_visual.device)
        from ...selection import top_counts_mask

        return top_counts_mask(score, counts, d.allowed)

    @override
    def keeps_everything(self) -> bool:
        return self.ratio >= 1

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """LearnPruner ending at the budget (R1 = 3 · R2 after stage 1)."""
        return [ratio_entry("learnpruner", budget, f"LearnPruner {pct(budget)}%", group="encoder")]
