"""SparseVLM (ICML 2025): text raters score the visual tokens at a few prefill layers; the best
of the dropped tokens are recycled as merged cluster tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ...rules import keep_count
from ...selection import top_counts_mask
from ..registry import Entry, pct, ratio_entry, register
from .base import Decision, HiddenEdit, PruningError, PruningMethod, Stage, check_ratio


def rater_rows(visual: torch.Tensor, text: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: the text tokens whose relevance m = mean over visual tokens of
    softmax over text of (visual · text) is above the mean relevance.

    Args:
        visual: [N, D] hidden states of one row's visual tokens.
        text: [Q, D] hidden states of its text rows.
        rows: [Q] bool, real text rows.

    Returns:
        [Q] bool.
    """
    logits = (visual.float() @ text.float().T).masked_fill(~rows[None, :], float("-inf"))  # [N, Q]
    relevance = logits.softmax(-1).mean(0)
    real = relevance[rows]
    return rows & (relevance > real.mean()) if len(real) else rows


def dpc_knn_clusters(points: torch.Tensor, n_clusters: int, k: int = 5) -> torch.Tensor:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), as SparseVLM recycles.

    Density ρ_i = exp(−mean squared distance to the k nearest neighbours); δ_i = distance to the
    nearest point of higher density (the largest distance for the densest); the ``n_clusters``
    points with the largest ρ·δ are centres and every point joins its nearest centre.

    Args:
        points: [P, D] the points to cluster.
        n_clusters: how many centres (clamped to 1..P).
        k: neighbours in the density estimate (clamped to 1..P-1).

    Returns:
        [P] long cluster index (0..n_clusters-1, the order of the centres).
    """
    p = points.float()
    n = len(p)
    n_clusters = max(1, min(n_clusters, n))
    dist = torch.cdist(p, p)
    k = max(1, min(k, n - 1)) if n > 1 else 1
    nearest = dist.topk(k + 1, largest=False).values[:, 1:] if n > 1 else torch.zeros(1, 1)
    density = torch.exp(-(nearest**2).mean(-1))
    higher = density[None, :] > density[:, None]
    delta = torch.where(higher, dist, torch.full_like(dist, float("inf"))).amin(-1)
    delta = torch.where(torch.isinf(delta), dist.max(-1).values, delta)
    centres = torch.sort(density * delta, descending=True, stable=True).indices[:n_clusters]
    return dist[:, centres].argmin(-1)


@register
@dataclass
class SparseVLM(PruningMethod):
    """SparseVLM (Zhang et al., ICML 2025; the ModelTC/llmc port's reading), at the prefill.

    At each stage layer (default the port's 2, 6 and 15 of 32 layers at the same relative depth)
    the *raters* are the prompt's text tokens after the image whose relevance to the image is
    above average (:func:`rater_rows`, on the layer's input hidden states); each visual token
    still kept is scored by the attention the raters pay it (head mean, mean over raters), and
    the top ones are kept from the next layer on, for the prompt and every generated token. Stage
    s of S keeps clamp(floor(ratio^{(s+1)/S} · N_v), 1, N_v) (a geometric schedule ending at the
    budget; the port's fixed 576-token schedules do not transfer to other N_v). **Recycling**: the
    top ``recycle`` share (+1) of the tokens a stage drops, by the same score, are clustered
    (:func:`dpc_knn_clusters`, ⌊n/10⌋ + 1 clusters) and each cluster's mean hidden state is
    written into its highest-scoring member, which stays visible.

    Deviation: SparseVLM inserts the recycled tokens after the kept ones; here they take the
    position of a member (positions are never renumbered in this package).
    """

    name: ClassVar[str] = "sparsevlm"
    keep_all_settings: ClassVar[dict[str, Any]] = {"ratio": 1.0}
    pruning_settings: ClassVar[dict[str, Any]] = {"ratio": 0.3}
    bad_settings: ClassVar[tuple[tuple[dict[str, Any], str], ...]] = (
        ({"recycle": 2.0}, "sparsevlm: recycle must be in [0, 1]"),
    )
    step_wise: ClassVar[bool] = False
    query_rows: ClassVar[str] = "text"
    wants_hidden: ClassVar[bool] = True
    ratio: float = 0.05
    layers: tuple[int, ...] | None = None
    recycle: float = 0.3

    def __post_init__(self) -> None:
        check_ratio("sparsevlm: ratio", self.ratio)
        if not 0 <= self.recycle <= 1:
            raise PruningError(f"sparsevlm: recycle must be in [0, 1], got {self.recycle}")

    @override
    def stages(self, n_layers: int) -> list[Stage]:
        layers = (
            self.layers
            if self.layers is not None
            else tuple(sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in (2 / 32, 6 / 32, 15 / 32)}))
        )
        if any(not 1 <= layer < n_layers for layer in layers) or list(layers) != sorted(set(layers)):
            raise PruningError(f"sparsevlm: stage layers {list(layers)} must be increasing within 1..{n_layers - 1}")
        return [Stage(layer - 1, layer) for layer in layers]

    def _counts(self, stage: int, n_stages: int, n_visual: torch.Tensor) -> torch.Tensor:
        share = self.ratio ** ((stage + 1) / n_stages)
        return torch.as_tensor(keep_count(share, n_visual.cpu().numpy()), device=n_visual.device)

    def scores(self, d: Decision) -> torch.Tensor:
        """[B, N] attention from the raters to each visual token (head mean, mean over raters)."""
        if d.text_probs is None or d.text_rows is None or d.hidden is None or d.text_index is None:
            raise PruningError("sparsevlm: needs the text rows' attention and the hidden states")
        out = []
        for b in range(d.text_probs.shape[0]):
            visual = d.hidden[b, d.visual_index[b, d.valid[b]]]
            text = d.hidden[b, d.text_index[b]]
            raters = rater_rows(visual, text, d.text_rows[b]).to(d.text_probs.dtype)  # [Q]
            probs = d.text_probs[b].mean(0)  # [Q, N]
            out.append((probs * raters[:, None]).sum(0) / raters.sum().clamp(min=1))
        return torch.stack(out)

    @override
    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        n_stages = len(self.stages(d.n_layers))
        return top_counts_mask(self.scores(d), self._counts(stage, n_stages, d.n_visual), d.allowed)

    def edits(self, stage: int, d: Decision, keep: torch.Tensor) -> tuple[torch.Tensor, list[HiddenEdit]]:
        """Token recycling: (the keep mask with each cluster's representative added back, the
        hidden-state edits writing the cluster means into them)."""
        if self.recycle == 0 or d.hidden is None:
            return keep, []
        score = self.scores(d)
        keep = keep.clone()
        edits = []
        for b in range(keep.shape[0]):
            dropped = (d.allowed[b] & ~keep[b]).nonzero().flatten()
            if len(dropped) == 0:
                continue
            take = min(len(dropped), math.ceil(self.recycle * len(dropped)) + 1)
            best = dropped[torch.sort(score[b, dropped], descending=True, stable=True).indices[:take]]
            positions = d.visual_index[b, best]
            cluster = dpc_knn_clusters(d.hidden[b, positions], len(best) // 10 + 1)
            for c in cluster.unique():
                members = best[cluster == c]
                lead = members[torch.argmax(score[b, members])]
                keep[b, lead] = True
                mean = d.hidden[b, d.visual_index[b, members]].float().mean(0)
                edits.append(HiddenEdit(b, int(d.visual_index[b, lead]), mean))
        return keep, edits

    @classmethod
    def comparison(cls, budget: float, n_layers: int) -> list[Entry]:
        """SparseVLM ending at the budget (recycled tokens come on top)."""
        return [ratio_entry("sparsevlm", budget, f"SparseVLM {pct(budget)}%", group="prefill")]
