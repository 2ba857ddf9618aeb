"""The organism v2's training-only visual-mass lever: how much text-only rows attend to the image.

In the VLMs the VisionPulse paper studies, decoding steps that produce text-only tokens put
almost no attention on the image; a tiny model trained on next-token loss alone has no reason to
look away from it (organism v1: 0.35–0.66 of every text-only step's attention on the image, at
every layer). The lever adds to the training loss the mean visual attention mass of the query
rows that predict text-only trace tokens, over every text layer and head. It says nothing about
image-reading rows (how much they look, or where), so localization and the budget's dynamics on
image-reading steps stay learned, not planted; data/README.md says what it does plant.

The text model keeps its own attention backend (SDPA): :class:`VisualMassLever` wraps it as a
registered attention function (:mod:`vpstudy.hooks`) that also recomputes, for the selected rows
only, softmax(q·kᵀ·scale) over the visible keys and its share on visual keys. Rows are few (the
trace's text-only tokens), so this costs a small fraction of the step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hooks import AttentionSwap

PREFIX = "vpstudy_lever_"
_ACTIVE: list[VisualMassLever] = []  # the lever whose rows the registered function reads


def _wrapper(
    function: Any,
    base: str,
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    out = function(module, query, key, value, attention_mask, **kwargs)
    if _ACTIVE and getattr(module, "layer_idx", None) is not None:
        _ACTIVE[-1].observe(query, key, kwargs.get("scaling"))
    return out


class VisualMassLever:
    """Collect, per text layer, the mean visual attention mass of chosen query rows.

    Use as a context manager around training forwards; call :meth:`select` before each forward
    and read :meth:`mass` after it.
    """

    def __init__(self, model: Any) -> None:
        self.swap = AttentionSwap(model, PREFIX, _wrapper)
        self.masses: list[torch.Tensor] = []
        self._tail = 0

    def __enter__(self) -> VisualMassLever:
        self.swap.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        self.swap.__exit__(*exc)

    def select(self, rows: torch.Tensor, visual: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The rows of the next forward to measure.

        Args:
            rows: [B, T] bool, query rows to measure (e.g. those predicting text-only tokens).
            visual: [B, T] bool, visual key positions.
            attention_mask: [B, T] 0/1, the batch's padding mask (left padding).
        """
        # only the last W positions hold selected rows (the trace comes last): score those alone
        first = int(rows.any(0).nonzero()[0]) if rows.any() else rows.shape[1]
        self._tail = rows.shape[1] - first
        positions = torch.arange(rows.shape[1])
        causal = positions[None, :] <= positions[first:, None]  # [W, T]
        self._visible = causal[None] & attention_mask.bool()[:, None, :]  # [B, W, T]
        self._rows = rows[:, first:]  # [B, W]
        self._visual = visual.to(torch.float32)  # [B, T]
        self.masses = []

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """One layer's call: the selected rows' head-mean visual mass (query [B, Hq, T, D], key
        [B, Hkv, T, D], not repeated for GQA)."""
        if self._tail == 0:
            return
        batch, kv_heads, dim = key.shape[0], key.shape[1], query.shape[-1]
        q = query[:, :, -self._tail :].reshape(batch, kv_heads, -1, self._tail, dim)  # [B, Hkv, g, W, D]
        logits = torch.einsum("bkgwd,bktd->bkgwt", q, key) * (scaling if scaling is not None else dim**-0.5)
        logits = logits.masked_fill(~self._visible[:, None, None], float("-inf"))
        mass = (logits.softmax(-1) * self._visual[:, None, None, None, :]).sum(-1).mean((1, 2))  # [B, W]
        self.masses.append(mass[self._rows].mean())

    def mass(self) -> torch.Tensor:
        """Mean over the layers seen since :meth:`select` (a differentiable scalar). The selection
        is then cleared: later forwards (e.g. validation decoding) are not measured."""
        self._tail = 0
        return torch.stack(self.masses).mean()
