"""VisionPulse (ICML 2026): a step-wise budget from the anchor layer's visual mass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...rules import BudgetRule, anchor_layer
from ...selection import budget_signal, rule_keep_counts, top_counts_mask
from ..registry import Entry, pct, register
from .base import (
    Decision,
    PruningError,
    PruningMethod,
    Stage,
    anchor_stage,
    check_ratio,
    head_mean_logits,
    head_mean_probs,
)

# the paper's rules by budget (tau, b_min, b_max): the rows of the comparison at 5% and 10%
PAPER_RULES: dict[float, dict[str, str]] = {
    0.05: {"tau": "0.1", "b_min": "0.01", "b_max": "0.05"},
    0.10: {"tau": "0.4", "b_min": "0.05", "b_max": "0.1"},
}


@register
@dataclass
class VisionPulse(PruningMethod):
    """VisionPulse (ICML 2026), eager semantics of the official code.

    At the anchor layer of every decode step: M = max over heads of the visual share of
    softmax(logits / τ); r = clamp(M, b_min, b_max) (or a fitted :class:`BudgetRule`'s ratio);
    K = clamp(floor(r · N_v), 1, N_v); keep the K visual keys with the highest head-mean
    pre-softmax logit; the others are hidden from this query at layers ≥ anchor (the anchor
    layer's own attention included). Published settings: τ = 0.1 with [0.01, 0.05] and τ = 0.4
    with [0.05, 0.10], anchor 17 of 36 (default: the same relative depth).

    Deviations: none in the decision. With ``rule`` the signal is the rule's (``mass``,
    ``max_head_mass`` or ``max_head_mass@tau=τ``) and the rule's slope, intercept, clamps and
    rounding apply; ``score="probs"`` ranks by head-mean probabilities instead of logits.
    """

    name: ClassVar[str] = "visionpulse"
    keep_all_settings: ClassVar[dict[str, Any]] = {"b_min": 1.0, "b_max": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"tau": 0.4, "b_min": 0.05, "b_max": 0.3}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"tau": 0.0}, "visionpulse: tau must be > 0"),
        ({"b_min": 0.2, "b_max": 0.1}, "visionpulse: b_min 0.2 > b_max 0.1"),
        ({"score": "x"}, "visionpulse: score must be"),
    )
    tau: float = 0.1
    b_min: float = 0.01
    b_max: float = 0.05
    anchor: int | None = None
    rule: BudgetRule | None = None
    rounding: str = "floor"
    score: str = "logits"
    allow_rule_mismatch: bool = False

    def __post_init__(self) -> None:
        if self.rule is None:
            if not self.tau > 0:
                raise PruningError(f"visionpulse: tau must be > 0, got {self.tau}")
            check_ratio("visionpulse: b_min", self.b_min)
            check_ratio("visionpulse: b_max", self.b_max)
            if self.b_min > self.b_max:
                raise PruningError(f"visionpulse: b_min {self.b_min} > b_max {self.b_max}")
            self.rule = replace(BudgetRule.paper(self.tau, self.b_min, self.b_max), rounding=self.rounding)
        if self.score not in ("logits", "probs"):
            raise PruningError(f"visionpulse: score must be 'logits' or 'probs', got {self.score!r}")

    @property
    def budget_rule(self) -> BudgetRule:
        """The rule in force: ``rule``, or the paper rule ``__post_init__`` built from the settings."""
        if self.rule is None:
            raise PruningError("visionpulse: no budget rule (the rule was reset to None after construction)")
        return self.rule

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor if self.anchor is not None else self.budget_rule.layer, n_layers)

    @override
    def prepare(self, model_config_hash: str, n_layers: int) -> None:
        (stage,) = self.stages(n_layers)
        self.budget_rule.check(
            config_hash=model_config_hash, layer=stage.decide_at, allow_mismatch=self.allow_rule_mismatch
        )

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        rule = self.budget_rule
        signal = budget_signal(d.logits, d.visual_index, d.valid, rule.signal)
        counts = rule_keep_counts(rule, signal, d.n_visual)
        scores = head_mean_logits(d) if self.score == "logits" else head_mean_probs(d)
        return top_counts_mask(scores, counts, d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """The paper's ≤5% (τ 0.1, [0.01, 0.05]) or ≤10% (τ 0.4, [0.05, 0.10]) rule; at 5% also
        VisionPulse on top of FastV at 50% (the paper's appendix composition)."""
        paper = PAPER_RULES.get(budget)
        if paper is None:
            return []
        label = f"visionpulse-{pct(budget)}"
        rows = [
            Entry(
                label,
                "visionpulse",
                paper,
                f"VisionPulse ≤{pct(budget)}% (paper rule)",
                budget=budget,
                anchor_setting="anchor",
            )
        ]
        if budget == 0.05:
            anchor = anchor_layer(n_layers)
            composed = {
                "fastv.layer": str(max(1, anchor)),
                "fastv.ratio": "0.5",
                **{f"visionpulse.{k}": v for k, v in paper.items()},
            }
            rows.append(
                Entry(
                    "fastv50+visionpulse-5", "fastv+visionpulse", composed, "FastV 50% + VisionPulse ≤5%", budget=budget
                )
            )
        return rows
