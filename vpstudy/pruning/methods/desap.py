"""DeSAP: decoupled similarity between the encoder's attention component and the text, fused with
[CLS] saliency; dropped tokens merged into their nearest kept ones."""

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


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Min-max scaling to [0, 1] (a constant vector maps to zeros)."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


@register
@dataclass
class DeSAP(PruningMethod):
    """DeSAP (Ma et al., 2026, "Decoupled Similarity for Task-Aware Token Pruning in LVLMs"),
    after the vision encoder.

    Our reading (the paper's formula was not available; this follows its description and the
    ClearCLIP decomposition its authors use): the last encoder block's output is residual +
    attention branch; the *attention component* of token i is that block's attention-module
    output (no residual), passed through the same projector as the features, so it lives where
    the language model's text embeddings live. Task relevance r_i = max over the prompt's text
    tokens t of cos(a_i, e_t), with e_t the language model's input embedding of each text token
    after the image (the question). Visual saliency s_i = the [CLS] attention of token i at that
    layer (the attention received, for encoders without [CLS]). Both are min-max scaled over the
    image and fused, score = alpha · r + (1 − alpha) · s; the top K = clamp(floor(ratio · N_v),
    1, N_v) are kept, and every dropped token is merged into its most similar kept token (cosine
    of the features), a kept feature becoming the mean of itself and the tokens merged into it.

    Choices where the paper is silent: max (not mean) over text tokens, so one relevant word is
    enough; alpha = 0.5; average merge. Kept tokens keep their positions.
    """

    name: ClassVar[str] = "desap"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.3}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"alpha": 2.0}, "desap: alpha must be in [0, 1]"),
    )
    step_wise: ClassVar[bool] = False
    acts_on_encoder: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...] | None] = ENCODER_FAMILIES
    ratio: float = 0.05
    alpha: float = 0.5
    merge: bool = True

    def __post_init__(self) -> None:
        check_ratio("desap: ratio", self.ratio)
        if not 0 <= self.alpha <= 1:
            raise PruningError(f"desap: alpha must be in [0, 1], got {self.alpha}")

    def scores(self, ctx: EncoderContext) -> torch.Tensor:
        """[N] fused score (task relevance and saliency, each scaled to [0, 1])."""
        if ctx.cls_attention is None or ctx.attention_output is None:
            raise PruningError("desap: the vision encoder's attention at the feature layer was not seen")
        if len(ctx.text_embeddings) == 0:
            relevance = torch.zeros_like(ctx.cls_attention)
        else:
            a = torch.nn.functional.normalize(ctx.attention_output.float(), dim=-1)
            t = torch.nn.functional.normalize(ctx.text_embeddings.float().to(a.device), dim=-1)
            relevance = (a @ t.T).max(dim=-1).values
        return self.alpha * _unit_range(relevance) + (1 - self.alpha) * _unit_range(ctx.cls_attention.float())

    @override
    def select_features(self, ctx: EncoderContext) -> FeatureSelection:
        n = ctx.features.shape[0]
        k = int(keep_count(self.ratio, n))
        if k >= n:
            return FeatureSelection(torch.arange(n))
        score = self.scores(ctx)
        order = torch.sort(score, descending=True, stable=True).indices
        kept = torch.sort(order[:k]).values
        if not self.merge:
            return FeatureSelection(kept, scores=score)
        dropped = torch.sort(order[k:]).values
        owner = assign_to_nearest(ctx.features[dropped], ctx.features[kept])
        return FeatureSelection(kept, merge_into(ctx.features, kept, dropped, owner, keep_target=False), scores=score)

    @override
    def keeps_everything(self) -> bool:
        return self.ratio >= 1

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """DeSAP keeping the budget's share of the visual tokens."""
        return [ratio_entry("desap", budget, f"DeSAP {pct(budget)}%", group="encoder")]
