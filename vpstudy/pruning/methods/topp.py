"""Top-p per decode step: the smallest visual set holding a share p of the step's visual attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...selection import top_p_mask
from ..registry import Entry, register
from .base import (
    Decision,
    PruningMethod,
    Stage,
    anchor_stage,
    check_ratio,
    head_mean_probs,
)


@register
@dataclass
class TopP(PruningMethod):
    """Top-p per step: the smallest set of visual tokens whose head-mean attention probability
    (τ = 1, at the anchor layer) reaches ``p`` of the step's visual mass."""

    name: ClassVar[str] = "topp"
    keep_all_settings: ClassVar[dict[str, Any]] = {"p": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"p": 0.5}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (({"p": 1.5}, "topp: p must be in (0, 1]"),)
    p: float = 0.5
    anchor: int | None = None

    def __post_init__(self) -> None:
        check_ratio("topp: p", self.p)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor, n_layers)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_p_mask(head_mean_probs(d), self.p, d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """Top-p at p = 0.5 (it has no per-step budget; one row)."""
        return [Entry("topp-50", "topp", {"p": "0.5"}, "top-p 0.5", anchor_setting="anchor")]
