"""Fixed top-K per decode step (the fixed-budget control of VisionPulse's ablation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...selection import fixed_keep_counts, top_counts_mask
from ..registry import Entry, pct, ratio_entry, register
from .base import (
    Decision,
    PruningMethod,
    Stage,
    anchor_stage,
    check_ratio,
    head_mean_logits,
)


@register
@dataclass
class TopK(PruningMethod):
    """Fixed top-K per step: K = clamp(floor(ratio · N_v), 1, N_v), ranked like VisionPulse
    (head-mean pre-softmax logits at the anchor layer), hidden at layers ≥ anchor."""

    name: ClassVar[str] = "topk"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.25}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"ratio": 0.0}, "topk: ratio must be in (0, 1]"),
    )
    ratio: float = 0.05
    anchor: int | None = None

    def __post_init__(self) -> None:
        check_ratio("topk: ratio", self.ratio)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor, n_layers)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_counts_mask(head_mean_logits(d), fixed_keep_counts(self.ratio, d.n_visual), d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """Fixed top-K at the budget, at the VisionPulse anchor."""
        return [ratio_entry("topk", budget, f"fixed top-K {pct(budget)}%", anchor_setting="anchor")]
