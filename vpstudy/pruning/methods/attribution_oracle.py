"""An upper reference for step-wise selection: the top-K visual tokens by gradient attribution of
the dense model's next token (captum), at every decode step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...rules import keep_count
from ...selection import top_counts_mask
from ..registry import Entry, pct, ratio_entry, register
from .base import Decision, PruningError, PruningMethod, Stage, anchor_stage, check_ratio


@register
@dataclass
class AttributionOracle(PruningMethod):
    """Attribution oracle (a reference row, not a method one could deploy): at every decode step,
    at the anchor layer, keep the K = clamp(floor(ratio · N_v), 1, N_v) visual tokens with the
    largest captum attribution (:class:`captum.attr.InputXGradient`, gradient × feature, summed
    over the hidden dimension) of the logit of the token the *dense* model predicts next, at the
    current prefix, to the visual features entering the language model; hide the others at
    layers ≥ anchor, as VisionPulse does. It peeks at a dense forward and backward of the whole
    prefix at every step (a second copy of the model, loaded from the model's directory), which
    is what no real pruner can afford: it shows what a step-wise selection could reach if it
    knew which tokens the step's output depends on, to first order.

    Families with 1-D RoPE whose features enter at the placeholder positions (LLaVA-1.5).
    """

    name: ClassVar[str] = "attribution_oracle"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.25}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"ratio": 0.0}, "attribution_oracle: ratio must be in (0, 1]"),
    )
    families: ClassVar[tuple[str, ...] | None] = ("llava",)
    ratio: float = 0.05
    anchor: int | None = None
    _dense: Any = field(default=None, init=False, repr=False, compare=False)
    _features: list[torch.Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio("attribution_oracle: ratio", self.ratio)

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        return anchor_stage(self.name, self.anchor, n_layers)

    @override
    def bind(self, model_dir: str | None) -> None:
        if self.ratio >= 1 or self._dense is not None:
            return
        from ...loading import load

        if model_dir is None:
            raise PruningError("attribution_oracle: the model's directory is unknown; it loads a dense copy from there")
        self._dense, _ = load(model_dir)

    @override
    def keeps_everything(self) -> bool:
        return self.ratio >= 1

    def begin_generation(self, batch: int, inputs: Mapping[str, Any] | None = None) -> None:
        """Keep each row's visual features (the first forward's precomputed ones, or the dense
        copy's from the pixels)."""
        self._features = []
        if self._dense is None or inputs is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
            if encoded is not None:
                self._features = [f.clone() for f in encoded.pooler_output]
            elif inputs.get("pixel_values") is not None:
                out = self._dense.model.get_image_features(pixel_values=inputs["pixel_values"].clone())
                self._features = list(out.pooler_output)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        if self.ratio >= 1:
            return d.allowed
        if d.prefix is None or not self._features:
            raise PruningError("attribution_oracle: the prefix and the visual features of this generation are unknown")
        from captum.attr import InputXGradient

        dense = self._dense
        with torch.inference_mode(False), torch.enable_grad():
            prefix = d.prefix.clone()
            mask = d.prefix_mask.clone() if d.prefix_mask is not None else torch.ones_like(prefix)
            features = torch.stack([f.float() for f in self._features]).to(prefix.device)  # [B, N, D]
            index = d.visual_index.clone()
            embed = dense.get_input_embeddings()

            def forward(visual: torch.Tensor) -> torch.Tensor:
                embeds = embed(prefix).float()
                rows = torch.arange(prefix.shape[0], device=prefix.device)[:, None]
                embeds = embeds.index_put((rows.expand_as(index), index), visual.to(embeds.dtype))
                return dense(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1, :]

            with torch.no_grad():
                target = forward(features).argmax(-1)
            attribution = InputXGradient(forward).attribute(features.requires_grad_(True), target=target)
            scores = attribution.detach().sum(-1).to(d.allowed.device)  # [B, N]
        counts = torch.as_tensor(keep_count(self.ratio, d.n_visual.cpu().numpy()), device=d.n_visual.device)
        return top_counts_mask(scores.masked_fill(~d.valid, float("-inf")), counts, d.allowed)

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """The oracle at the budget, at the VisionPulse anchor (an upper reference row)."""
        display = f"attribution oracle top-K {pct(budget)}% (reference)"
        return [ratio_entry("attribution_oracle", budget, display, group="reference", anchor_setting="anchor")]
