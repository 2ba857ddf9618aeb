"""DSTP (ECCV 2026): a prefill method's visual set, re-selected during decoding when the relevant
visual information shifts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ..registry import Entry, pct, register
from .base import Decision, PruningError, PruningMethod, Stage, check_ratio, head_mean_probs
from .fastv import FastV
from .static_topk import StaticTopK

BASES = ("static_topk", "fastv")


def attention_shift(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity of two visual attention vectors per row: [B, N] x2 -> [B]."""
    return 1 - torch.nn.functional.cosine_similarity(current.float(), reference.float(), dim=-1, eps=1e-12)


@register
@dataclass
class DSTP(PruningMethod):
    """DSTP, decoding-stage shift-aware token pruning (Kim et al., ECCV 2026), as an add-on to a
    prefill method (``base``: ``static_topk`` or ``fastv``, with its ``ratio`` kept and its layer).

    Our reading (DSTP's code and equations were not available; its project page says it
    "adaptively swaps visual tokens during decoding" when the relevant visual information shifts;
    the trigger follows DyCoke, the closest published mechanism): the base method selects its set
    at the prefill exactly as alone. At every decode step, at the base's decision layer, the shift
    between the step's visual attention (head-mean probabilities at the visual keys) and the
    attention the current set was chosen from is 1 − cosine(p̄_t, p̄_ref). When it exceeds
    ``threshold`` (default 0.1, DyCoke's 0.9 similarity), the set is chosen again by the base's own
    rule from this step's attention (the same number of tokens) and p̄_ref becomes p̄_t; the new
    set holds from the base's acting layer on for this and later steps until the next
    re-selection. Swapped-in tokens come from the full KV cache (which the pruner never shrinks).
    The re-selections per sample are reported (:attr:`reselections`).
    """

    name: ClassVar[str] = "dstp"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.3, "threshold": 0.0}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"base": "topk"}, "dstp: base must be one of"),
        ({"threshold": 3.0}, "dstp: threshold"),
    )
    step_wise: ClassVar[bool] = False
    reselects: ClassVar[bool] = True
    base: str = "static_topk"
    ratio: float = 0.05
    threshold: float = 0.1
    anchor: int | None = None
    reselections: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _reference: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _base: PruningMethod | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio("dstp: ratio", self.ratio)
        if self.base not in BASES:
            raise PruningError(f"dstp: base must be one of {', '.join(BASES)}, got {self.base!r}")
        if not 0 <= self.threshold <= 2:
            raise PruningError(f"dstp: threshold (1 − cosine) must be in [0, 2], got {self.threshold}")
        if self.base == "fastv":
            self._base = FastV(layer=self.anchor if self.anchor is not None else 2, ratio=round(1 - self.ratio, 9))
        else:
            self._base = StaticTopK(ratio=self.ratio, anchor=self.anchor)
        self.dense_prefill = self._base.dense_prefill  # type: ignore[misc]

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        assert self._base is not None
        return self._base.stages(n_layers)

    @override
    def begin_generation(self, batch: int, inputs: Any = None) -> None:
        self.reselections = [0] * batch
        self._reference = None

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        """The prefill decision: the base's set; remember the attention it came from."""
        assert self._base is not None
        self._reference = head_mean_probs(d)
        return self._base.keep(stage, d)

    def reselect(self, stage: int, d: Decision, current: torch.Tensor) -> torch.Tensor:
        """A decode step's decision: ``current`` [B, N] unless the shift crosses the threshold."""
        assert self._base is not None
        now = head_mean_probs(d)
        if self._reference is None:
            self._reference = now
            return current
        shifted = attention_shift(now, self._reference) > self.threshold
        if not bool(shifted.any()):
            return current
        fresh = self._base.keep(stage, replace(d, allowed=d.valid))
        rows = shifted[:, None]
        self._reference = torch.where(rows, now, self._reference)
        for b in shifted.nonzero().flatten().tolist():
            if b < len(self.reselections):
                self.reselections[b] += 1
        return torch.where(rows, fresh, current)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """DSTP on the static top-K at the budget (same anchor as VisionPulse)."""
        return [
            Entry(
                f"dstp-static_topk-{pct(budget)}",
                "dstp",
                {"ratio": str(budget)},
                f"DSTP on static top-K {pct(budget)}%",
                group="prefill",
                budget=budget,
                anchor_setting="anchor",
            )
        ]
