"""VisionZip (CVPR 2025): keep the dominant tokens by [CLS] attention, merge the rest into a few
contextual tokens, before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...families import ENCODER_FAMILIES
from ...rules import keep_count
from ..registry import Entry, pct, ratio_entry, register
from .base import EncoderContext, FeatureSelection, PruningError, PruningMethod, check_ratio
from .merging import assign_to_nearest, merge_into


@register
@dataclass
class VisionZip(PruningMethod):
    """VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip), after the vision encoder.

    K = clamp(floor(ratio · N_v), 1, N_v) tokens are kept per image: D = K − C *dominant* tokens,
    the patches with the most [CLS] attention (head-summed, at the encoder layer that produces the
    features; ties to the lower index), and C = round(contextual_share · K) *contextual* tokens:
    C targets chosen uniformly (every ⌊n/C⌋-th) among the n remaining tokens, each other remaining
    token assigned to its most similar target (cosine of the head-mean key states at that layer),
    and each target's feature replaced by target + mean of its assigned tokens (VisionZip's
    formula). Defaults: contextual share 10/64, the paper's 54 + 10 split for 64 tokens.

    Deviations: (1) the merge is applied to the features entering the language model (after the
    projector), VisionZip merges encoder states before the projector; (2) kept tokens keep their
    positions (dropped ones are hidden from every text layer), VisionZip re-packs dominant then
    contextual tokens into a shorter sequence; (3) encoders without a [CLS] token (Qwen-VL) rank
    by the attention each token receives, averaged over the image's tokens.
    """

    name: ClassVar[str] = "visionzip"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.3}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"contextual_share": 1.0}, "visionzip: contextual_share must be in [0, 1)"),
    )
    step_wise: ClassVar[bool] = False
    acts_on_encoder: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...] | None] = ENCODER_FAMILIES
    ratio: float = 0.05
    contextual_share: float = 10 / 64

    def __post_init__(self) -> None:
        check_ratio("visionzip: ratio", self.ratio)
        if not 0 <= self.contextual_share < 1:
            raise PruningError(f"visionzip: contextual_share must be in [0, 1), got {self.contextual_share}")

    @override
    def select_features(self, ctx: EncoderContext) -> FeatureSelection:
        n = ctx.features.shape[0]
        k = int(keep_count(self.ratio, n))
        if k >= n:
            return FeatureSelection(torch.arange(n))
        if ctx.cls_attention is None or ctx.keys is None:
            raise PruningError("visionzip: the vision encoder's attention at the feature layer was not seen")
        contextual = min(round(self.contextual_share * k), k - 1, n - k)
        dominant_count = k - contextual
        order = torch.sort(ctx.cls_attention, descending=True, stable=True).indices
        dominant = order[:dominant_count]
        rest = torch.sort(order[dominant_count:]).values
        if contextual == 0:
            return FeatureSelection(torch.sort(dominant).values, scores=ctx.cls_attention)
        stride = max(1, len(rest) // contextual)
        targets = rest[::stride][:contextual]
        others = rest[~torch.isin(rest, targets)]
        owner = assign_to_nearest(ctx.keys[others], ctx.keys[targets])
        merged = merge_into(ctx.features, targets, others, owner, keep_target=True)
        kept = torch.cat([dominant, targets])
        features = torch.cat([ctx.features[dominant], merged])
        order = torch.argsort(kept)
        return FeatureSelection(kept[order], features[order], scores=ctx.cls_attention)

    @override
    def keeps_everything(self) -> bool:
        return self.ratio >= 1

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """VisionZip keeping the budget's share of the visual tokens (dominant + contextual)."""
        return [ratio_entry("visionzip", budget, f"VisionZip {pct(budget)}%", group="encoder")]
