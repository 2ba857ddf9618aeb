"""PyramidDrop (CVPR 2025): staged drops of visual tokens during the prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...selection import top_counts_mask
from ..registry import Entry, pct, register
from .base import (
    Decision,
    PruningError,
    PruningMethod,
    Stage,
    check_ratio,
    head_mean_probs,
)


@register
@dataclass
class PyramidDrop(PruningMethod):
    """PyramidDrop (CVPR 2025): the model is split into stages; at the end of each stage the
    visual tokens still kept are ranked by the head-mean attention of the last prompt token at
    that layer and a share ``keep_ratio`` (λ) of them is kept for the following stages.
    Default stage ends at 1/4, 1/2 and 3/4 of the depth with λ = 0.5 (the paper's 8/16/24 of 32
    layers). Removal is masking, as for :class:`FastV`."""

    name: ClassVar[str] = "pyramiddrop"
    keep_all_settings: ClassVar[dict[str, Any]] = {"keep_ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"keep_ratio": 0.5}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"keep_ratio": 0.0}, "pyramiddrop: keep_ratio must be in (0, 1]"),
    )
    step_wise: ClassVar[bool] = False
    layers: tuple[int, ...] | None = None
    keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_ratio("pyramiddrop: keep_ratio", self.keep_ratio)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        layers = (
            self.layers
            if self.layers is not None
            else tuple(sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in (0.25, 0.5, 0.75)}))
        )
        if any(not 1 <= layer < n_layers for layer in layers) or list(layers) != sorted(set(layers)):
            raise PruningError(f"pyramiddrop: stage layers {list(layers)} must be increasing within 1..{n_layers - 1}")
        return [Stage(layer - 1, layer) for layer in layers]

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        remaining = d.allowed.sum(-1)
        counts = torch.maximum(
            torch.ceil(self.keep_ratio * remaining.double() - 1e-9).long(), torch.ones_like(remaining)
        )
        return top_counts_mask(head_mean_probs(d), counts, d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """PyramidDrop with λ per stage such that λ^stages = the budget."""
        stages = len(cls().stages(n_layers))
        return [
            Entry(
                f"pyramiddrop-{pct(budget)}",
                "pyramiddrop",
                {"keep_ratio": f"{budget ** (1 / stages):.4f}"},
                f"PyramidDrop {pct(budget)}%",
                group="prefill",
                budget=budget,
            )
        ]
