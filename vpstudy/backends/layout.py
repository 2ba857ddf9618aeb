"""What every decode-attention backend takes and returns: the key layout of a decode step and the
anchor layer's selection.

Shapes: B = sequences in the batch, H_q / H_kv = query / key-value heads (GQA: query head h uses
KV head ``h // (H_q / H_kv)``, as transformers' ``repeat_kv``), T = key slots in the cache, D =
head dim, N = the widest sequence's visual-token count.

A sequence's keys live in cache slots ``[start, end)`` (slots before ``start`` are left padding,
slots from ``end`` on are not written yet, as in a static cache). Its visual tokens are the one
contiguous run ``[visual_start, visual_start + visual_len)`` inside it; every other key is
non-visual and always attended. That is the layout of one image (or video) per prompt, which is
what the fast path serves; other layouts run on the reference path of the pruner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpstudy.errors import VpstudyError


class LayoutError(VpstudyError):
    """A key layout or selection that does not fit the cache it describes; the message says which field."""


@dataclass(frozen=True)
class KeyLayout:
    """Where each sequence's keys are in the cache at one decode step.

    Attributes:
        start: [B] int32, first visible cache slot.
        end: [B] int32, one past the last visible slot (the current query's own key included).
        visual_start: [B] int32, first visual slot.
        visual_len: [B] int32, N_v (≥ 1).
        visual_width: N, the largest ``visual_len`` (the width of per-visual-token outputs),
            known on the host so that backends need not synchronise to read it.
    """

    start: torch.Tensor
    end: torch.Tensor
    visual_start: torch.Tensor
    visual_len: torch.Tensor
    visual_width: int

    @classmethod
    def build(cls, start, end, visual_start, visual_len, device: torch.device | str | None = None) -> KeyLayout:
        """From sequences of ints or tensors (one entry per sequence), as int32 on ``device``."""
        fields = [torch.as_tensor(x, dtype=torch.int32, device=device).reshape(-1)
                  for x in (start, end, visual_start, visual_len)]  # fmt: skip
        if len({f.numel() for f in fields}) != 1:
            raise LayoutError(f"layout fields disagree on the batch size: {[f.numel() for f in fields]}")
        start_t, end_t, visual_start_t, visual_len_t = fields
        return cls(start_t, end_t, visual_start_t, visual_len_t, visual_width=int(visual_len_t.max()))

    @property
    def batch(self) -> int:
        """B, the number of sequences the layout describes."""
        return self.start.numel()

    @property
    def visual_end(self) -> torch.Tensor:
        """[B] int32, one past each sequence's last visual slot (``visual_start + visual_len``)."""
        return self.visual_start + self.visual_len

    def check(self, n_slots: int) -> None:
        """Raise :class:`LayoutError` unless 0 ≤ start ≤ visual_start, visual_len ≥ 1,
        visual_end ≤ end ≤ ``n_slots`` for every sequence (this synchronises with the device)."""
        checks = {
            "start >= 0": self.start >= 0,
            "start <= visual_start": self.start <= self.visual_start,
            "visual_len >= 1": self.visual_len >= 1,
            "visual_start + visual_len <= end": self.visual_end <= self.end,
            f"end <= cache slots ({n_slots})": self.end <= n_slots,
            f"visual_len <= visual_width ({self.visual_width})": self.visual_len <= self.visual_width,
        }
        for name, ok in checks.items():
            if not bool(ok.all()):
                rows = (~ok).nonzero().flatten().tolist()
                raise LayoutError(f"key layout: {name} fails for sequence(s) {rows}")

    def key_mask(self, n_slots: int) -> torch.Tensor:
        """[B, T] bool: the slots each sequence attends to when nothing is pruned."""
        slots = torch.arange(n_slots, device=self.start.device)[None, :]
        return (slots >= self.start[:, None].long()) & (slots < self.end[:, None].long())

    def visual_mask(self, n_slots: int) -> torch.Tensor:
        """[B, T] bool: the visual slots."""
        slots = torch.arange(n_slots, device=self.start.device)[None, :]
        return (slots >= self.visual_start[:, None].long()) & (slots < self.visual_end[:, None].long())

    def visual_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index [B, N] long slot of each visual token, padded with 0; valid [B, N] bool)``."""
        width = self.visual_width
        offsets = torch.arange(width, device=self.start.device)[None, :]
        valid = offsets < self.visual_len[:, None].long()
        return torch.where(valid, self.visual_start[:, None].long() + offsets, 0), valid


@dataclass(frozen=True)
class KeptSet:
    """The visual tokens a sequence keeps at one decode step.

    Attributes:
        index: [B, W] int32, visual-relative indices (0 .. N_v − 1), ascending in the first
            ``count`` entries; entries after them are ignored. With ``block > 1`` each entry is a
            block of ``block`` consecutive visual tokens (the last block of a sequence is cut at N_v).
        count: [B] int32, entries in use.
        block: tokens per entry (1 = token-exact).
    """

    index: torch.Tensor
    count: torch.Tensor
    block: int = 1

    def token_mask(self, visual_len: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] bool over visual-relative indices: the kept tokens."""
        batch, entries = self.index.shape
        device = self.index.device
        tokens = (self.index.long()[:, :, None] * self.block + torch.arange(self.block, device=device)).flatten(1)
        used = (torch.arange(entries, device=device)[None, :] < self.count[:, None].long())
        used = used[:, :, None].expand(-1, -1, self.block).flatten(1) & (tokens < visual_len[:, None].long())
        mask = torch.zeros(batch, width + 1, dtype=torch.bool, device=device)
        mask.scatter_(1, torch.where(used, tokens, width).clamp(max=width), True)
        return mask[:, :width]

    def kept_tokens(self, visual_len: torch.Tensor) -> torch.Tensor:
        """[B] long: visual tokens actually kept (a block cut at N_v counts its real tokens)."""
        return self.token_mask(visual_len, int(visual_len.max())).sum(-1)


@dataclass(frozen=True)
class AnchorSelection:
    """The anchor layer's decision for every sequence of a decode step.

    Attributes:
        mass: [B] float32, head-mean visual attention mass at τ = 1 (M(t, l)).
        head_mass_tau: [B, H_q] float32, each head's visual share of softmax(logits / τ).
        signal: [B] float32, the budget rule's signal (max or mean over heads of the share at
            the rule's τ).
        scores: [B, N] float32, the ranking score of each visual token (head-mean pre-softmax
            logits, or head-mean probabilities at τ = 1); 0 past a sequence's N_v.
        kept: the top-``count`` visual tokens by ``scores`` (ties to the lower index).
    """

    mass: torch.Tensor
    head_mass_tau: torch.Tensor
    signal: torch.Tensor
    scores: torch.Tensor
    kept: KeptSet


def check_decode_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
                        layout: KeyLayout) -> None:  # fmt: skip
    """One-line errors for shapes a decode backend cannot take (no device synchronisation)."""
    if query.dim() != 3:
        raise LayoutError(f"query must be [B, H_q, D], got shape {tuple(query.shape)}")
    if key.dim() != 4:
        raise LayoutError(f"key must be [B, H_kv, T, D], got shape {tuple(key.shape)}")
    if value is not None and value.shape != key.shape:
        raise LayoutError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    batch, heads, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim:
        raise LayoutError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head dim")
    if heads % key.shape[1]:
        raise LayoutError(f"query heads ({heads}) are not a multiple of key-value heads ({key.shape[1]})")
    if layout.batch != batch:
        raise LayoutError(f"layout describes {layout.batch} sequences, the query has {batch}")
