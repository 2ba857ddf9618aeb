"""A random visual set of a given expected size per decode step (an uninformed control)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...selection import top_counts_mask
from ..registry import Entry, pct, register
from .base import (
    Decision,
    PruningMethod,
    Stage,
    anchor_stage,
    check_ratio,
)


@register
@dataclass
class RandomBudget(PruningMethod):
    """Random budget: at each step keep K = clamp(floor(ratio · N_v + U), 1, N_v) visual tokens
    (U uniform in [0, 1), so the expected count is ratio · N_v even when it is not a whole
    number), drawn uniformly at random (seeded), at layers ≥ anchor. Set ``ratio`` to another
    run's mean kept fraction to compare the same budget with an uninformed choice. (The paper
    does not say how its random budget was sampled.)"""

    name: ClassVar[str] = "random"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.25, "seed": 3}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"ratio": -1.0}, "random: ratio must be in (0, 1]"),
    )
    ratio: float = 0.05
    anchor: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio("random: ratio", self.ratio)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor, n_layers)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        noise = torch.rand(d.allowed.shape, generator=d.generator).to(d.allowed.device)
        dither = torch.rand(d.n_visual.shape, generator=d.generator, dtype=torch.float64).to(d.n_visual.device)
        counts = torch.floor(self.ratio * d.n_visual.double() + dither).long().clamp(min=1)
        return top_counts_mask(noise, torch.minimum(counts, d.n_visual), d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """A random set of VisionPulse's mean kept fraction at the same budget (set from that row;
        none at a budget where VisionPulse has no paper rule, so no row to take it from)."""
        from .visionpulse import PAPER_RULES

        if budget not in PAPER_RULES:
            return []
        source = f"visionpulse-{pct(budget)}"
        return [
            Entry(
                f"random-like-{source}",
                "random",
                {},
                f"random set, VisionPulse ≤{pct(budget)}%'s mean budget",
                budget=budget,
                ratio_from=source,
                anchor_setting="anchor",
            )
        ]
