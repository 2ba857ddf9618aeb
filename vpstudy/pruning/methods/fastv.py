"""FastV (ECCV 2024): drop the least-attended visual tokens once, at a prefill layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...rules import anchor_layer
from ...selection import top_counts_mask
from ..registry import Entry, pct, register
from .base import (
    Decision,
    PruningError,
    PruningMethod,
    Stage,
    head_mean_probs,
)


@register
@dataclass
class FastV(PruningMethod):
    """FastV (ECCV 2024), as its code does: at layer K the visual tokens are ranked by the
    head-mean attention the last prompt token paid them at layer K − 1, and the lowest
    ``ratio`` of them are removed from layer K on, for the rest of the prompt and every
    generated token. Here removal is masking (nobody attends to them at layers ≥ K), which gives
    the same outputs for the kept positions; positions keep their original RoPE indices, as in
    FastV. Defaults K = 2, R = 0.5 (the paper's); the VisionPulse paper ran FastV at layer 17."""

    name: ClassVar[str] = "fastv"
    keep_all_settings: ClassVar[dict[str, Any]] = {"layer": 1, "ratio": 0.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"layer": 1, "ratio": 0.5}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"ratio": 1.0}, "fastv: ratio (share removed) must be in [0, 1)"),
    )
    step_wise: ClassVar[bool] = False
    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise PruningError(f"fastv: ratio (share removed) must be in [0, 1), got {self.ratio}")

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        if not 1 <= self.layer < n_layers:
            raise PruningError(f"fastv: layer {self.layer} out of range: needs 1..{n_layers - 1}")
        return [Stage(self.layer - 1, self.layer)]

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        counts = torch.maximum(
            torch.ceil((1 - self.ratio) * d.n_visual.double() - 1e-9).long(), torch.ones_like(d.n_visual)
        )
        return top_counts_mask(head_mean_probs(d), counts, d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """FastV keeping the budget from the VisionPulse anchor depth on (the paper ran FastV at 17 of 36)."""
        layer = max(1, anchor_layer(n_layers))
        return [
            Entry(
                f"fastv-{pct(budget)}",
                "fastv",
                {"layer": str(layer), "ratio": str(round(1 - budget, 6))},
                f"FastV {pct(budget)}%",
                group="prefill",
                budget=budget,
                anchor_setting="layer",
            )
        ]
