"""Pruning methods: small dataclasses that decide which visual keys a query may see.

A method has one or more *stages*. A stage is decided at one text layer from that layer's
attention row of the current query (the last prompt row at prefill, the decode query at a
step), and acts at every layer from its ``from_layer`` on:

- *step-wise* methods (VisionPulse, fixed top-K, top-p, random budget) decide again at every
  decode step at their anchor layer and act on that step's query at layers ≥ anchor only; the
  prefill stays dense and the KV cache is never touched, so a token dropped at step t may come
  back at t + 1 (SPEC, VisionPulse budget);
- *prefill* methods (FastV, PyramidDrop, static top-K) decide once during the prefill and their
  drops hold for the rest of the generation.

Methods compose (a prefill method and a step-wise one, e.g. FastV + VisionPulse): a stage sees
the keys earlier stages left visible, and a key is visible only if every method keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

from ..rules import BudgetRule, anchor_layer
from ..selection import (
    budget_signal,
    fixed_keep_counts,
    rule_keep_counts,
    top_counts_mask,
    top_p_mask,
    visual_logits,
    visual_share,
)
from ..errors import VpstudyError


class PruningError(VpstudyError):
    """A pruning method or setting that cannot be used (one-line message naming it)."""


@dataclass
class Decision:
    """What a stage sees when it decides, for every batch row.

    Attributes:
        logits: [B, H, T] float32 pre-softmax logits of the deciding query row (scaled, masked
            with -inf where the key is not visible, including keys earlier stages dropped).
        visual_index: [B, N] key positions of the visual tokens (padded).
        valid: [B, N] bool, real visual tokens.
        allowed: [B, N] bool, real visual tokens still visible at this layer.
        n_visual: [B] long, real visual tokens per row.
        step: decoding step (0 = the prefill's last row).
        generator: seeded generator for methods that draw at random.
    """

    logits: torch.Tensor
    visual_index: torch.Tensor
    valid: torch.Tensor
    allowed: torch.Tensor
    n_visual: torch.Tensor
    step: int
    generator: torch.Generator


def _check_ratio(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise PruningError(f"{name} must be in (0, 1], got {value}")


def _anchor_stage(method: str, anchor: int | None, n_layers: int) -> list[Stage]:
    """The one stage of an anchored method: decided and acting at ``anchor`` (default: the
    VisionPulse anchor depth), which must be a layer of the model."""
    layer = anchor_layer(n_layers) if anchor is None else anchor
    if not 0 <= layer < n_layers:
        raise PruningError(f"{method}: anchor layer {layer} out of range: the text model has {n_layers} layers (0..{n_layers - 1})")  # fmt: skip
    return [Stage(layer, layer)]


def _head_mean_logits(d: Decision) -> torch.Tensor:
    return visual_logits(d.logits, d.visual_index).mean(dim=1)  # [B, N]


def _head_mean_probs(d: Decision) -> torch.Tensor:
    return visual_share(d.logits, d.visual_index, d.valid).mean(dim=1)  # [B, N]


@dataclass(frozen=True)
class Stage:
    """One decision of a method: made at ``decide_at`` and acting from ``acts_from`` on."""

    decide_at: int
    acts_from: int


@dataclass
class PruningMethod:
    """Base of every method. Subclasses set ``name`` and ``step_wise`` and implement
    :meth:`stages` and :meth:`keep`."""

    name: ClassVar[str] = ""
    step_wise: ClassVar[bool] = True

    def stages(self, n_layers: int) -> list[Stage]:
        raise NotImplementedError

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        """[B, N] bool: the visual tokens kept by stage ``stage`` (a subset of ``d.allowed``)."""
        raise NotImplementedError

    def prepare(self, model_config_hash: str, n_layers: int) -> None:
        """Validate against the model before any generation (default: check the stages)."""
        self.stages(n_layers)


# -- step-wise ---------------------------------------------------------------------------------


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
            _check_ratio("visionpulse: b_min", self.b_min)
            _check_ratio("visionpulse: b_max", self.b_max)
            if self.b_min > self.b_max:
                raise PruningError(f"visionpulse: b_min {self.b_min} > b_max {self.b_max}")
            self.rule = replace(BudgetRule.paper(self.tau, self.b_min, self.b_max), rounding=self.rounding)
        if self.score not in ("logits", "probs"):
            raise PruningError(f"visionpulse: score must be 'logits' or 'probs', got {self.score!r}")

    def stages(self, n_layers: int) -> list[Stage]:
        return _anchor_stage(self.name, self.anchor if self.anchor is not None else self.rule.layer, n_layers)

    def prepare(self, model_config_hash: str, n_layers: int) -> None:
        (stage,) = self.stages(n_layers)
        self.rule.check(config_hash=model_config_hash, layer=stage.decide_at, allow_mismatch=self.allow_rule_mismatch)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        signal = budget_signal(d.logits, d.visual_index, d.valid, self.rule.signal)
        counts = rule_keep_counts(self.rule, signal, d.n_visual)
        scores = _head_mean_logits(d) if self.score == "logits" else _head_mean_probs(d)
        return top_counts_mask(scores, counts, d.allowed)


@dataclass
class TopK(PruningMethod):
    """Fixed top-K per step: K = clamp(floor(ratio · N_v), 1, N_v), ranked like VisionPulse
    (head-mean pre-softmax logits at the anchor layer), hidden at layers ≥ anchor."""

    name: ClassVar[str] = "topk"
    ratio: float = 0.05
    anchor: int | None = None

    def __post_init__(self) -> None:
        _check_ratio("topk: ratio", self.ratio)

    def stages(self, n_layers: int) -> list[Stage]:
        return _anchor_stage(self.name, self.anchor, n_layers)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_counts_mask(_head_mean_logits(d), fixed_keep_counts(self.ratio, d.n_visual), d.allowed)


@dataclass
class TopP(PruningMethod):
    """Top-p per step: the smallest set of visual tokens whose head-mean attention probability
    (τ = 1, at the anchor layer) reaches ``p`` of the step's visual mass."""

    name: ClassVar[str] = "topp"
    p: float = 0.5
    anchor: int | None = None

    def __post_init__(self) -> None:
        _check_ratio("topp: p", self.p)

    def stages(self, n_layers: int) -> list[Stage]:
        return _anchor_stage(self.name, self.anchor, n_layers)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_p_mask(_head_mean_probs(d), self.p, d.allowed)


@dataclass
class RandomBudget(PruningMethod):
    """Random budget: at each step keep K = clamp(floor(ratio · N_v + U), 1, N_v) visual tokens
    (U uniform in [0, 1), so the expected count is ratio · N_v even when it is not a whole
    number), drawn uniformly at random (seeded), at layers ≥ anchor. Set ``ratio`` to another
    run's mean kept fraction to compare the same budget with an uninformed choice. (The paper
    does not say how its random budget was sampled.)"""

    name: ClassVar[str] = "random"
    ratio: float = 0.05
    anchor: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_ratio("random: ratio", self.ratio)

    def stages(self, n_layers: int) -> list[Stage]:
        return _anchor_stage(self.name, self.anchor, n_layers)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        noise = torch.rand(d.allowed.shape, generator=d.generator).to(d.allowed.device)
        dither = torch.rand(d.n_visual.shape, generator=d.generator, dtype=torch.float64).to(d.n_visual.device)
        counts = torch.floor(self.ratio * d.n_visual.double() + dither).long().clamp(min=1)
        return top_counts_mask(noise, torch.minimum(counts, d.n_visual), d.allowed)


# -- prefill -----------------------------------------------------------------------------------


@dataclass
class FastV(PruningMethod):
    """FastV (ECCV 2024), as its code does: at layer K the visual tokens are ranked by the
    head-mean attention the last prompt token paid them at layer K − 1, and the lowest
    ``ratio`` of them are removed from layer K on, for the rest of the prompt and every
    generated token. Here removal is masking (nobody attends to them at layers ≥ K), which gives
    the same outputs for the kept positions; positions keep their original RoPE indices, as in
    FastV. Defaults K = 2, R = 0.5 (the paper's); the VisionPulse paper ran FastV at layer 17."""

    name: ClassVar[str] = "fastv"
    step_wise: ClassVar[bool] = False
    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise PruningError(f"fastv: ratio (share removed) must be in [0, 1), got {self.ratio}")

    def stages(self, n_layers: int) -> list[Stage]:
        if not 1 <= self.layer < n_layers:
            raise PruningError(f"fastv: layer {self.layer} out of range: needs 1..{n_layers - 1}")
        return [Stage(self.layer - 1, self.layer)]

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        counts = torch.maximum(torch.ceil((1 - self.ratio) * d.n_visual.double() - 1e-9).long(), torch.ones_like(d.n_visual))
        return top_counts_mask(_head_mean_probs(d), counts, d.allowed)


@dataclass
class PyramidDrop(PruningMethod):
    """PyramidDrop (CVPR 2025): the model is split into stages; at the end of each stage the
    visual tokens still kept are ranked by the head-mean attention of the last prompt token at
    that layer and a share ``keep_ratio`` (λ) of them is kept for the following stages.
    Default stage ends at 1/4, 1/2 and 3/4 of the depth with λ = 0.5 (the paper's 8/16/24 of 32
    layers). Removal is masking, as for :class:`FastV`."""

    name: ClassVar[str] = "pyramiddrop"
    step_wise: ClassVar[bool] = False
    layers: tuple[int, ...] | None = None
    keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check_ratio("pyramiddrop: keep_ratio", self.keep_ratio)

    def stages(self, n_layers: int) -> list[Stage]:
        layers = self.layers if self.layers is not None else tuple(sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in (0.25, 0.5, 0.75)}))  # fmt: skip
        if any(not 1 <= layer < n_layers for layer in layers) or list(layers) != sorted(set(layers)):
            raise PruningError(f"pyramiddrop: stage layers {list(layers)} must be increasing within 1..{n_layers - 1}")
        return [Stage(layer - 1, layer) for layer in layers]

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        remaining = d.allowed.sum(-1)
        counts = torch.maximum(torch.ceil(self.keep_ratio * remaining.double() - 1e-9).long(), torch.ones_like(remaining))
        return top_counts_mask(_head_mean_probs(d), counts, d.allowed)


@dataclass
class StaticTopK(PruningMethod):
    """Static top-K at prefill (a control for step dependence): the visual tokens are ranked once,
    by the last prompt row's head-mean logits at the anchor layer, and the same top
    K = clamp(floor(ratio · N_v), 1, N_v) are the only ones visible at layers ≥ anchor for every
    generated token. The prefill itself stays dense, as in VisionPulse; only the per-step
    re-selection differs."""

    name: ClassVar[str] = "static_topk"
    step_wise: ClassVar[bool] = False
    ratio: float = 0.05
    anchor: int | None = None
    dense_prefill: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_ratio("static_topk: ratio", self.ratio)

    def stages(self, n_layers: int) -> list[Stage]:
        return _anchor_stage(self.name, self.anchor, n_layers)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        return top_counts_mask(_head_mean_logits(d), fixed_keep_counts(self.ratio, d.n_visual), d.allowed)


METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (VisionPulse, TopK, TopP, RandomBudget, FastV, PyramidDrop, StaticTopK)
}


def make_method(name: str, **settings: object) -> PruningMethod:
    """A method by name with settings (e.g. ``make_method("topk", ratio=0.05)``); a one-line
    :class:`PruningError` for an unknown name or setting."""
    cls = METHODS.get(name)
    if cls is None:
        raise PruningError(f"unknown pruning method {name!r} (known: {', '.join(METHODS)})")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PruningError(f"{name}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**settings)

