"""The decode kernels of :mod:`vpstudy.backends.reference` in plain torch, written for CPUs: the
pruner's fast path where there is no Triton or xformers (``backend="cpu"``; what ``auto`` takes
without CUDA).

The same virtual key list as the Triton kernels (:mod:`vpstudy.kernels.sparse_decode`), in torch
operations that read only what a step must read:

- **Written slots only.** A sequence attends cache slots ``[start, end)``; a static cache's
  unwritten tail (and the left padding of other rows) is never read.
- :func:`sparse_decode`, per sequence: the non-visual keys before and after the image are
  strided views of the cache (read in place, no copy); the kept visual keys (token-exact, or
  blocks) are gathered row by row (:func:`gather_slots`) — the only copies, K rows of K and of
  V; the segments' logits go into one softmax, and the output is the sum of each segment's
  probabilities times its values. No mask is built and a hidden key is never read. With
  ``kept=None`` (dense decode) the sequence's one run ``[start, end)`` is read in place.
- :func:`gather_slots` reads the cache's rows where they are: the cache (or its written part,
  a strided view of a static cache) is addressed as one table of ``D``-element rows and the
  wanted rows are taken with one ``index_select``. (``index_select`` along the slot axis of a
  non-contiguous view first copies the whole view; ``torch.gather`` with an index expanded over
  the head dim reads the index as much as the data.)
- :func:`anchor_select`: one logits row over ``[min start, max end)`` (q · K read once for all
  query heads of a KV head, float32), the rule's signal and the ranking scores with the
  reference's own arithmetic (so the budget and the ranking are the mask-mode pruner's), and
  the top K without sorting (:func:`vpstudy.selection.top_counts_mask`: the K-th largest score,
  every score above it, the lowest-index ties at it) placed as ascending indices by a running
  count.

GQA: query head h uses KV head ``h // (H_q / H_kv)`` (the query is grouped, KV heads are never
repeated). Results agree with the reference within float32 rounding (different summation
order); ``tests/test_backend_cpu.py`` checks them on ragged batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vpstudy.attention import row_logits
from vpstudy.rules import BudgetRule, parse_signal
from vpstudy.selection import rule_keep_counts, top_counts_mask, visual_logits

from .layout import AnchorSelection, KeptSet, KeyLayout, LayoutError, check_decode_inputs
from .reference import SCORES


def _window(layout: KeyLayout, n_slots: int) -> tuple[int, int]:
    """``[lo, hi)``: the cache slots some sequence attends (left padding of every row and the
    unwritten tail excluded), on the host."""
    lo, hi = int(layout.start.min()), int(layout.end.max())
    if not 0 <= lo <= hi <= n_slots:
        raise LayoutError(f"key layout: slots [{lo}, {hi}) do not fit a cache of {n_slots} slots")
    return lo, hi


def row_table(states: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """A cache [B, H, T, D] as one table of ``D``-element rows, ``(table, rows per batch row, rows
    per head)``, when its rows are contiguous and every head and batch row starts at a multiple of
    ``D`` elements (transformers' caches, and views of their first slots); else None."""
    batch, heads, slots, dim = states.shape
    stride_b, stride_h, stride_t, stride_d = states.stride()
    if stride_d != 1 or stride_t != dim or stride_h % dim or stride_b % dim or min(stride_b, stride_h) < 0:
        return None
    row_b, row_h = stride_b // dim, stride_h // dim
    return states.as_strided(((batch - 1) * row_b + (heads - 1) * row_h + slots, dim), (dim, 1)), row_b, row_h


def table_rows(index: torch.Tensor, heads: int, row_b: int, row_h: int) -> torch.Tensor:
    """[B · H · W] long: the rows of :func:`row_table` holding slots ``index`` [B, W] of every head."""
    device = index.device
    base = (torch.arange(index.shape[0], device=device) * row_b)[:, None, None] + \
        (torch.arange(heads, device=device) * row_h)[None, :, None]  # fmt: skip
    return (base + index[:, None, :]).flatten()


def gather_slots(states: torch.Tensor, index: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a cache at given slots, per batch row: states [B, H, T, D], index [B, W] long
    (slots in ``[0, T)``) -> [B, H, W, D], a copy of the W rows only.

    The storage is read as a table of rows (:func:`row_table`) and one ``index_select`` takes
    them (``rows``: :func:`table_rows` of ``index``, when the caller has them already); a layout
    that is no such table goes through ``torch.gather``."""
    batch, heads, _, dim = states.shape
    table = row_table(states)
    if table is None:
        return states.gather(2, index[:, None, :, None].expand(batch, heads, index.shape[1], dim))
    rows = table_rows(index, heads, table[1], table[2]) if rows is None else rows
    return table[0].index_select(0, rows).view(batch, heads, index.shape[1], dim)


def top_k_kept(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> KeptSet:
    """The ``counts[b]`` highest scores of each row's valid entries, ties to the lower index
    (:func:`vpstudy.selection.top_counts_mask`, which finds them without sorting), as ascending
    indices (a running count places them, no sort either).

    Args:
        scores: [B, N] float ranking scores.
        counts: [B] long, 1 ≤ counts[b] ≤ valid entries of row b.
        valid: [B, N] bool.
    """
    keep = top_counts_mask(scores, counts, valid)
    widest = int(counts.max())
    slot = torch.where(keep, keep.cumsum(-1) - 1, widest)  # position among the kept, or a spare column
    index = torch.zeros(scores.shape[0], widest + 1, dtype=torch.long, device=scores.device)
    index.scatter_(1, slot, torch.arange(scores.shape[1], device=scores.device).expand_as(slot))
    return KeptSet(index[:, :widest].to(torch.int32), keep.sum(-1).to(torch.int32))


def anchor_select(query: torch.Tensor, key: torch.Tensor, layout: KeyLayout, rule: BudgetRule, *, scale: float,
                  score: str = "logits") -> AnchorSelection:  # fmt: skip
    """The anchor layer's decision for one decode step (see :func:`vpstudy.backends.reference.anchor_select`).

    Args:
        query: [B, H_q, D] decode queries (after RoPE).
        key: [B, H_kv, T, D] the layer's cache (only ``[min start, max end)`` is read).
        layout: where each sequence's keys and visual tokens are.
        rule: budget rule (its signal, τ, slope, intercept, clamps and rounding).
        scale: logit scale.
        score: rank by head-mean ``"logits"`` or ``"probs"`` (τ = 1).
    """
    if score not in SCORES:
        raise LayoutError(f"score must be one of {SCORES}, got {score!r}")
    check_decode_inputs(query, key, None, layout)
    lo, hi = _window(layout, key.shape[2])
    logits = row_logits(query, key[:, :, lo:hi], scale)  # [B, H, W]
    if bool((layout.start != lo).any() or (layout.end != hi).any()):  # rows differ: hide the others' slots
        slots = torch.arange(lo, hi, device=key.device)[None, :]
        visible = (slots >= layout.start[:, None].long()) & (slots < layout.end[:, None].long())
        logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    index, valid = layout.visual_index()
    starts, lengths = set(layout.visual_start.tolist()), set(layout.visual_len.tolist())
    if len(starts) == 1 and len(lengths) == 1:  # one visual run for all rows (always at batch 1): a slice
        (first,), (width,) = starts, lengths

        def visual(x: torch.Tensor) -> torch.Tensor:  # [B, H, W] -> [B, H, N]
            return x.narrow(-1, first - lo, width)

    else:
        index = (index - lo).clamp(min=0)  # window-relative (padding entries stay masked by ``valid``)

        def visual(x: torch.Tensor) -> torch.Tensor:
            return visual_logits(x, index) * valid.unsqueeze(1)

    kind, tau = parse_signal(rule.signal)
    share = visual(torch.softmax(logits, dim=-1))  # [B, H, N] at τ = 1, as visual_share computes it
    share_tau = share if tau == 1.0 else visual(torch.softmax(logits / tau, dim=-1))
    head_mass_tau = share_tau.sum(-1)  # [B, H]
    signal = head_mass_tau.mean(dim=1) if kind == "mass" else head_mass_tau.amax(dim=1)
    counts = rule_keep_counts(rule, signal, layout.visual_len.long())
    ranking = visual(logits).mean(dim=1) if score == "logits" else share.mean(dim=1)
    kept = top_k_kept(ranking, counts, valid)
    return AnchorSelection(mass=share.mean(dim=1).sum(-1), head_mass_tau=head_mass_tau, signal=signal.float(),
                           scores=torch.where(valid, ranking, 0.0), kept=kept)  # fmt: skip


def _kept_slots(kept: KeptSet, b: int, visual_start: int, visual_len: int) -> torch.Tensor:
    """[K] long cache slots of sequence ``b``'s kept visual tokens (blocks expanded, cut at N_v)."""
    entries = kept.index[b, : int(kept.count[b])].long()
    if kept.block == 1:
        return entries + visual_start
    tokens = (entries[:, None] * kept.block + torch.arange(kept.block, device=entries.device)).flatten()
    return tokens[tokens < visual_len] + visual_start


@dataclass(frozen=True)
class AttendPlan:
    """The cache slots each sequence attends at one decode step under a kept set.

    Attributes:
        index: [B, W] long: per sequence its non-visual slots before the image, its kept visual
            slots (ascending) and its non-visual slots after the image, padded to the widest row
            with the row's first slot.
        mask: [B, 1, 1, W] bool, False at padding (None when every row has W slots).
        end: one past the last slot any sequence attends (checked against each layer's cache).
        rows: the :func:`table_rows` of ``index`` by the cache's (heads, rows per batch row, rows
            per head): every layer's cache has the same layout, so they are computed once.
    """

    index: torch.Tensor
    mask: torch.Tensor | None
    end: int  # one past the last slot any sequence attends
    rows: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict, compare=False)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, H, W, D]: the attended rows (:func:`gather_slots`)."""
        table = row_table(states)
        if table is None:
            return gather_slots(states, self.index)
        shape = (states.shape[1], table[1], table[2])
        if shape not in self.rows:
            self.rows[shape] = table_rows(self.index, *shape)
        return table[0].index_select(0, self.rows[shape]).view(*states.shape[:2], self.index.shape[1], states.shape[3])


_LAST_PLAN: list[Any] = [None, None, None]  # (layout, kept, plan) of the last call: every layer of a step shares it


def attend_plan(layout: KeyLayout, kept: KeptSet) -> AttendPlan:
    """The :class:`AttendPlan` of ``layout`` and ``kept``, built once per decode step (the same two
    objects come back for every layer from the anchor on, and the plan is reused)."""
    if _LAST_PLAN[0] is layout and _LAST_PLAN[1] is kept:
        return _LAST_PLAN[2]
    bounds = zip(layout.start.tolist(), layout.end.tolist(), layout.visual_start.tolist(),
                 layout.visual_len.tolist(), strict=True)  # fmt: skip
    device = layout.start.device
    rows = [torch.cat([torch.arange(start, visual_start, device=device), _kept_slots(kept, b, visual_start, visual_len),
                       torch.arange(visual_start + visual_len, end, device=device)])
            for b, (start, end, visual_start, visual_len) in enumerate(bounds)]  # fmt: skip
    lengths = [len(r) for r in rows]
    width = max(lengths)
    index = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
    mask = None
    if min(lengths) < width:
        filled = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        mask = filled[:, None, None]
    plan = AttendPlan(index, mask, int(layout.end.max()))
    _LAST_PLAN[:] = [layout, kept, plan]
    return plan


def sparse_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: KeyLayout,
                  kept: KeptSet | None, *, scale: float, return_lse: bool = False):  # fmt: skip
    """Decode attention over the non-visual keys and the kept visual keys (all keys of
    ``[start, end)`` when ``kept`` is None), in float32.

    With ``kept=None`` the keys are read in place (the window ``[min start, max end)``, a view of
    the cache, with a mask only where rows differ). With a kept set, one :func:`gather_slots` of
    K and one of V take the attended rows (:func:`attend_plan`: the kept visual keys and the few
    non-visual ones; gathering those too costs less on a CPU than the extra operations of
    reading them in place). Attention is one ``scaled_dot_product_attention`` call (GQA without
    repeating the KV heads); with ``return_lse`` the logits are formed explicitly instead.

    Returns:
        [B, H_q, D] in ``query.dtype``; with ``return_lse`` also the [B, H_q] float32
        log-sum-exp of the attended logits.
    """
    check_decode_inputs(query, key, value, layout)
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    if kept is None:
        lo, hi = _window(layout, key.shape[2])
        keys, values = key[:, :, lo:hi], value[:, :, lo:hi]
        mask = None
        if bool((layout.start != lo).any() or (layout.end != hi).any()):
            slots = torch.arange(lo, hi, device=key.device)[None, :]
            mask = ((slots >= layout.start[:, None].long()) & (slots < layout.end[:, None].long()))[:, None, None]
    else:
        plan = attend_plan(layout, kept)
        if plan.end > key.shape[2]:
            raise LayoutError(f"key layout: slots up to {plan.end} do not fit a cache of {key.shape[2]} slots")
        with torch.profiler.record_function("vpstudy::gather_kept"):
            keys, values = plan.gather(key), plan.gather(value)
        mask = plan.mask
    q = query.float()
    keys, values = keys.float(), values.float()
    if not return_lse:
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=heads != kv_heads)  # fmt: skip
        return out[:, :, 0].to(query.dtype)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)) * scale  # [B, H_kv, G, W]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.softmax(logits, dim=-1), values).reshape(batch, heads, dim)
    return out.to(query.dtype), lse.reshape(batch, heads)
