"""Pure-torch references of the decode kernels: the semantics every backend is tested against.

They run on any device in float32 and are built from the pruner's own selection operations
(:mod:`vpstudy.selection`), so a backend that matches them makes the decisions the
mask-mode pruner makes. Shapes as in :mod:`vpstudy.backends.layout`.
"""

from __future__ import annotations

import torch

from vpstudy.attention import row_logits
from vpstudy.rules import BudgetRule, parse_signal
from vpstudy.selection import rule_keep_counts, top_counts_mask, visual_logits, visual_share

from .layout import AnchorSelection, KeptSet, KeyLayout, LayoutError, check_decode_inputs

SCORES = ("logits", "probs")


def masked_logits(query: torch.Tensor, key: torch.Tensor, layout: KeyLayout, scale: float) -> torch.Tensor:
    """[B, H_q, T] float32 logits of each sequence's decode query, -inf outside ``[start, end)``."""
    logits = row_logits(query, key, scale)
    return logits.masked_fill(~layout.key_mask(key.shape[2])[:, None, :], float("-inf"))


def kept_from_mask(keep: torch.Tensor) -> KeptSet:
    """A token-exact :class:`KeptSet` from a [B, N] keep mask (indices ascending)."""
    count = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, ascending
    return KeptSet(order.to(torch.int32), count.to(torch.int32))


def anchor_select(query: torch.Tensor, key: torch.Tensor, layout: KeyLayout, rule: BudgetRule, *, scale: float,
                  score: str = "logits") -> AnchorSelection:  # fmt: skip
    """The anchor layer's decision for one decode step (VisionPulse / a fitted rule).

    Args:
        query: [B, H_q, D] decode queries (after RoPE).
        key: [B, H_kv, T, D] the layer's cache.
        layout: where each sequence's keys and visual tokens are.
        rule: budget rule (its signal, τ, slope, intercept, clamps and rounding).
        scale: logit scale (usually D**-0.5).
        score: rank visual tokens by head-mean ``"logits"`` (VisionPulse) or ``"probs"`` (τ = 1).
    """
    if score not in SCORES:
        raise LayoutError(f"score must be one of {SCORES}, got {score!r}")
    check_decode_inputs(query, key, None, layout)
    logits = masked_logits(query, key, layout, scale)
    index, valid = layout.visual_index()
    kind, tau = parse_signal(rule.signal)
    share = visual_share(logits, index, valid)  # [B, H, N] at τ = 1
    share_tau = share if tau == 1.0 else visual_share(logits, index, valid, tau)
    head_mass_tau = share_tau.sum(-1)  # [B, H]
    signal = head_mass_tau.mean(dim=1) if kind == "mass" else head_mass_tau.amax(dim=1)
    counts = rule_keep_counts(rule, signal, layout.visual_len.long())
    ranking = visual_logits(logits, index).mean(dim=1) if score == "logits" else share.mean(dim=1)
    keep = top_counts_mask(ranking, counts, valid)
    return AnchorSelection(mass=share.mean(dim=1).sum(-1), head_mass_tau=head_mass_tau, signal=signal.float(),
                           scores=torch.where(valid, ranking, 0.0), kept=kept_from_mask(keep))  # fmt: skip


def attended_slots(layout: KeyLayout, kept: KeptSet | None, n_slots: int) -> torch.Tensor:
    """[B, T] bool: the cache slots a sequence attends to (non-visual keys and kept visual keys)."""
    visible = layout.key_mask(n_slots)
    if kept is None:
        return visible
    index, valid = layout.visual_index()
    keep = kept.token_mask(layout.visual_len, index.shape[1]) & valid
    hidden = torch.zeros_like(visible, dtype=torch.int32).scatter_add(1, index, (valid & ~keep).to(torch.int32))
    return visible & (hidden == 0)


def sparse_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: KeyLayout,
                  kept: KeptSet | None, *, scale: float, return_lse: bool = False):  # fmt: skip
    """Decode attention over the non-visual keys and the kept visual keys (all visual keys when
    ``kept`` is None), in float32.

    Returns:
        [B, H_q, D] in ``query.dtype``; with ``return_lse`` also the [B, H_q] float32
        log-sum-exp of the attended logits.
    """
    check_decode_inputs(query, key, value, layout)
    batch, heads, dim = query.shape
    kv_heads, n_slots = key.shape[1], key.shape[2]
    logits = row_logits(query, key, scale)
    logits = logits.masked_fill(~attended_slots(layout, kept, n_slots)[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None]).reshape(batch, kv_heads, heads // kv_heads, n_slots)
    out = torch.matmul(probs, value.float()).reshape(batch, heads, dim).to(query.dtype)
    return (out, lse) if return_lse else out


def block_cover(kept: KeptSet, visual_len: torch.Tensor, block: int) -> KeptSet:
    """The block-sparse variant of a selection: every ``block``-token block of visual tokens that
    holds a kept token (so the rule's tokens are all kept, plus their block neighbours).

    Returns a :class:`KeptSet` with ``block`` tokens per entry; its actual retention is
    ``cover.kept_tokens(visual_len) / visual_len``.
    """
    if block < 1:
        raise LayoutError(f"block must be >= 1, got {block}")
    width = int(visual_len.max())
    tokens = kept.token_mask(visual_len, width)
    n_blocks = -(-width // block)
    padded = torch.zeros(tokens.shape[0], n_blocks * block, dtype=torch.bool, device=tokens.device)
    padded[:, :width] = tokens
    blocks = padded.reshape(tokens.shape[0], n_blocks, block).any(-1)
    cover = kept_from_mask(blocks)
    return KeptSet(cover.index, cover.count, block)
