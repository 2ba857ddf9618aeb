"""Static top-K chosen once at the prefill (the control for step dependence)."""

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
class StaticTopK(PruningMethod):
    """Static top-K at prefill (a control for step dependence): the visual tokens are ranked once,
    by the last prompt row's head-mean logits at the anchor layer, and the same top
    K = clamp(floor(ratio · N_v), 1, N_v) are the only ones visible at layers ≥ anchor for every
    generated token. The prefill itself stays dense, as in VisionPulse; only the per-step
    re-selection differs."""

    name: ClassVar[str] = "static_topk"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.25}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"ratio": 2.0}, "static_topk: ratio must be in (0, 1]"),
    )
    step_wise: ClassVar[bool] = False
    ratio: float = 0.05
    anchor: int | None = None
    dense_prefill: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_ratio("static_topk: ratio", self.ratio)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor, n_layers)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_counts_mask(head_mean_logits(d), fixed_keep_counts(self.ratio, d.n_visual), d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """Top-K chosen once at the prefill, at the VisionPulse anchor."""
        display = f"static top-K {pct(budget)}% at prefill"
        return [ratio_entry("static_topk", budget, display, group="prefill", anchor_setting="anchor")]
