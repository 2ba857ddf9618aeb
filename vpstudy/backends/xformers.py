"""The decode kernels of :mod:`vpstudy.backends.reference` on xformers' partial attention (CUDA,
float16/bfloat16).

The design: ``memory_efficient_attention_partial`` + ``merge_attentions``; the visual mass is
``exp(lse_visual − lse_all)`` and no probability matrix is formed.

Each sequence's keys are split into segments: the non-visual keys before the image
``[start, visual_start)``, the visual keys ``[visual_start, visual_end)`` and the non-visual keys
after it ``[visual_end, end)``; empty segments are skipped.

- :func:`sparse_decode` runs one partial attention per segment (the visual segment holds the
  kept visual keys, gathered by ``index_select``) and merges them with ``merge_attentions``.
- :func:`anchor_select` takes each head's visual share from the segment log-sum-exps,
  ``share_h = exp(lse_visual_h − lse_all_h)`` with ``lse_all = logaddexp`` over the segments, at
  τ = 1 and at the rule's τ (logit scale ``scale / τ``). It recomputes one row of visual logits
  (``q · k_visual · scale`` in float32) to rank the visual tokens, then keeps the top K exactly
  as the reference does.

GQA: xformers' 5-D BMGHK layout, the query as ``[1, 1, H_kv, H_q / H_kv, D]`` and each key or
value segment as ``[1, L, H_kv, 1, D]`` expanded with stride 0 over the heads of a group, so KV
heads are never copied (query head h uses KV head ``h // (H_q / H_kv)``, as ``repeat_kv`` does).

Ragged batches: transformers' cache is ``[B, H_kv, T, D]`` with a different ``[start, end)`` and
visual run per sequence. xformers' ragged-batch biases (``BlockDiagonal*``) need keys packed as
``[1, ΣT, ...]``, which would copy the whole cache at every step, so this backend loops over the
sequences, passes strided views of the cache (no copy) and ``attn_bias=None``. The layout is
read on the host once per call, and each sequence's kept slots once per sequence (device
synchronisations; the gathered keys are the only copies, K per sequence).

:func:`unavailable_reason` asks for CUDA, float16/bfloat16 and a head dim the partial-capable ops
take (multiples of 8 up to 256), then xformers' own checks on a probe input. Both functions raise
:class:`~vpstudy.backends.errors.BackendUnavailable` with that reason.

xformers is imported only inside functions: it takes seconds to import and warns on a machine
without CUDA. Attention runs only in :func:`_partial` and :func:`_merge` (the two places that
import ``xformers.ops.fmha``), so the tests replace that module by fakes and run the logic on CPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from vpstudy.attention import row_logits
from vpstudy.backends.layout import AnchorSelection, KeptSet, KeyLayout, LayoutError, check_decode_inputs
from vpstudy.backends.reference import SCORES, kept_from_mask
from vpstudy.rules import BudgetRule, parse_signal
from vpstudy.selection import rule_keep_counts, top_counts_mask

from .errors import BackendUnavailable

DTYPES = (torch.float16, torch.bfloat16)
# the partial-capable ops memory_efficient_attention_partial dispatches to on CUDA, fa3F and fa2F
# (xformers/ops/fmha/flash3.py, flash.py: SUPPORTED_MAX_K = 256, and
# check_lastdim_alignment_stride1(..., 8) on the query)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8

Bounds = tuple[int, int, int, int]  # start, visual_start, visual_end, end of one sequence


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when xformers can run this backend on ``device`` with ``dtype`` and ``head_dim``;
    otherwise why not, in one line."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"xformers backend needs a CUDA device (got {device.type})"
    if dtype not in DTYPES:
        return f"xformers backend needs float16 or bfloat16 (got {dtype})"
    if head_dim > MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        return (f"xformers backend: head dim {head_dim} is not supported by the partial-attention ops "
                f"(fa3F/fa2F take multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM})")  # fmt: skip
    if not torch.cuda.is_available():
        return f"xformers backend needs a CUDA device (got {device}, but torch.cuda.is_available() is False)"
    return _xformers_reason(device, dtype, head_dim)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@functools.cache
def _xformers_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why xformers itself cannot run a partial attention here: not importable, no triton for
    ``merge_attentions``, or every partial-capable op it would dispatch to refuses a probe input."""
    try:
        from xformers.ops import fmha
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
        return _one_line(f"xformers is not installed / cannot import: {type(e).__name__}: {e}")
    if importlib.util.find_spec("triton") is None:
        return "xformers backend: merge_attentions needs triton, which is not installed"
    probe = torch.empty(1, 1, 1, 1, head_dim, device=device, dtype=dtype)
    inputs = fmha.Inputs(query=probe, key=probe, value=probe, scale=1.0, is_partial=True)
    # the ops memory_efficient_attention_partial tries, in order (fmha/__init__.py: it dispatches
    # with needs_gradient=True); a private helper, pinned by the xformers==0.0.35 requirement
    ops = [op for op in fmha.dispatch._dispatch_fw_priority_list(inputs, True) if op.SUPPORTS_PARTIAL]
    reasons = {op.NAME: op.not_supported_reasons(inputs) for op in ops}
    if any(not r for r in reasons.values()):
        return None
    details = "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items()) or "none is built"
    return _one_line(f"xformers backend: no partial-attention op runs on {device} with {dtype}, "
                     f"head dim {head_dim} ({details})")  # fmt: skip


def _require(query: torch.Tensor, *others: torch.Tensor) -> None:
    """Raise :class:`BackendUnavailable` unless xformers can run on ``query``'s device, dtype and
    head dim, and :class:`LayoutError` unless keys and values share its dtype (xformers mixes none)."""
    reason = unavailable_reason(query.device, query.dtype, query.shape[-1])
    if reason is not None:
        raise BackendUnavailable(reason)
    for other in others:
        if other.dtype != query.dtype:
            raise LayoutError(f"xformers backend: key/value dtype {other.dtype} differs from the query's {query.dtype}")


def _partial(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Xformers' partial attention of BMGHK inputs.

    Args:
        query: [B, M, G, H, D].
        key: [B, L, G, H, D] (L ≥ 1).
        value: [B, L, G, H, D], the same L as ``key``.
        scale: logit scale.

    Returns:
        ``(out [B, M, G, H, D], lse [B, G, H, M] float32)``; ``out`` is float32 or the query's
        dtype, depending on the op xformers picks.
    """
    from xformers.ops.fmha import memory_efficient_attention_partial

    return memory_efficient_attention_partial(query, key, value, scale=scale)


def _merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Xformers' merge of partial attentions over disjoint key sets of the same query.

    Args:
        outs: [B, M, G, H, D] each, the partial outputs.
        lses: [B, G, H, M] each, the partial log-sum-exps, one per entry of ``outs``.

    Returns:
        ``(out [B, M, G, H, D] in the dtype of outs[0], lse [B, G, H, M])``.
    """
    from xformers.ops.fmha import merge_attentions

    return merge_attentions(outs, lses, write_lse=True)


def _query5(query_row: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[H_q, D] -> [1, 1, H_kv, H_q / H_kv, D] (BMGHK, one query)."""
    return query_row.reshape(1, 1, kv_heads, query_row.shape[0] // kv_heads, query_row.shape[1])


def _keys5(keys: torch.Tensor, group: int) -> torch.Tensor:
    """[H_kv, L, D] view of the cache -> [1, L, H_kv, group, D], stride 0 over the group (no copy)."""
    return keys.transpose(0, 1)[None, :, :, None, :].expand(-1, -1, -1, group, -1)


def _host_bounds(layout: KeyLayout, n_slots: int) -> list[Bounds]:
    """Each sequence's (start, visual_start, visual_end, end), checked against the cache."""
    layout.check(n_slots)
    table = torch.stack([layout.start, layout.visual_start, layout.visual_end, layout.end], dim=1)
    return [tuple(row) for row in table.tolist()]


def _nonvisual(bounds: Bounds) -> list[tuple[int, int]]:
    """The non-empty non-visual slot ranges of one sequence."""
    start, visual_start, visual_end, end = bounds
    return [(s, e) for s, e in ((start, visual_start), (visual_end, end)) if e > s]


def _attend(query5: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]],
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention of one query over the union of key segments.

    Args:
        query5: [1, 1, H_kv, G, D].
        segments: (keys, values) [H_kv, L, D] each, L ≥ 1, at least one segment.
        scale: logit scale.

    Returns:
        ``(out [H_q, D], lse [H_q] float32)``.
    """
    group = query5.shape[3]
    parts = [_partial(query5, _keys5(k, group), _keys5(v, group), scale) for k, v in segments]
    out, lse = parts[0] if len(parts) == 1 else _merge([o for o, _ in parts], [s for _, s in parts])
    return out.reshape(-1, out.shape[-1]), lse.reshape(-1).float()


def sparse_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: KeyLayout,
                  kept: KeptSet | None, *, scale: float, return_lse: bool = False):  # fmt: skip
    """Decode attention over the non-visual keys and the kept visual keys (all visual keys when
    ``kept`` is None), as :func:`vpstudy.backends.reference.sparse_decode`.

    Args:
        query: [B, H_q, D] decode queries (after RoPE), float16 or bfloat16 on CUDA.
        key: [B, H_kv, T, D] the layer's key cache, in the query's dtype.
        value: [B, H_kv, T, D] the layer's value cache, in the query's dtype.
        layout: where each sequence's keys and visual tokens are.
        kept: the visual tokens each sequence keeps (token-exact or blocks), or None.
        scale: logit scale (usually D**-0.5).
        return_lse: also return the log-sum-exp of the attended logits.

    Returns:
        [B, H_q, D] in ``query.dtype``; with ``return_lse`` also the [B, H_q] float32
        log-sum-exp of the attended logits.

    Raises:
        BackendUnavailable: xformers cannot run here (see :func:`unavailable_reason`).
        LayoutError: shapes, dtypes or a layout that do not fit, or a sequence that attends to no key.
    """
    check_decode_inputs(query, key, value, layout)
    _require(query, key, value)
    keep = None if kept is None else kept.token_mask(layout.visual_len, layout.visual_width)  # [B, N]
    outs, lses = [], []
    for b, bounds in enumerate(_host_bounds(layout, key.shape[2])):
        segments = [(key[b, :, s:e], value[b, :, s:e]) for s, e in _nonvisual(bounds)]
        visual_start, visual_end = bounds[1], bounds[2]
        if keep is None:
            segments.append((key[b, :, visual_start:visual_end], value[b, :, visual_start:visual_end]))
        else:
            slots = keep[b, : visual_end - visual_start].nonzero().flatten() + visual_start
            if slots.numel():
                segments.append((key[b].index_select(1, slots), value[b].index_select(1, slots)))
        if not segments:
            raise LayoutError(f"xformers backend: sequence {b} attends to no key (no non-visual key, nothing kept)")
        out, lse = _attend(_query5(query[b], key.shape[1]), segments, scale)
        outs.append(out.to(query.dtype))
        lses.append(lse)
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if return_lse else out


def _segment_lses(query5: torch.Tensor, keys: torch.Tensor, bounds: Bounds,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-sum-exps of one query's logits at ``scale`` over the visual keys and over all its keys.

    Args:
        query5: [1, 1, H_kv, G, D].
        keys: [H_kv, T, D] the sequence's cache.
        bounds: the sequence's (start, visual_start, visual_end, end) cache slots.
        scale: logit scale (divided by τ for the tempered shares).

    Returns:
        ``(lse_visual [H_q], lse_all [H_q])`` float32 (the key tensor stands in for the values:
        only the log-sum-exps are used).
    """
    group = query5.shape[3]

    def lse(s: int, e: int) -> torch.Tensor:
        k5 = _keys5(keys[:, s:e], group)
        return _partial(query5, k5, k5, scale)[1].reshape(-1).float()

    visual = lse(bounds[1], bounds[2])
    lse_all = torch.logsumexp(torch.stack([visual] + [lse(s, e) for s, e in _nonvisual(bounds)]), dim=0)
    return visual, lse_all


def _visual_shares(query5: torch.Tensor, keys: torch.Tensor, bounds: Bounds, scale: float,
                   tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each head's visual share of one query's attention at τ = 1 and at ``tau``.

    Returns:
        ``(share [H_q], share_tau [H_q], lse_all [H_q] at τ = 1)``, float32.
    """
    visual, lse_all = _segment_lses(query5, keys, bounds, scale)
    share = torch.exp(visual - lse_all)
    if tau == 1.0:
        return share, share, lse_all
    visual_tau, lse_all_tau = _segment_lses(query5, keys, bounds, scale / tau)
    return share, torch.exp(visual_tau - lse_all_tau), lse_all


def _ranking(query_row: torch.Tensor, visual_keys: torch.Tensor, lse_all: torch.Tensor, scale: float,
             score: str) -> torch.Tensor:  # fmt: skip
    """[N_v] float32 ranking scores of one sequence's visual tokens from one recomputed row of
    visual logits: head-mean logits, or head-mean probabilities ``exp(logit − lse_all)`` at τ = 1.

    Args:
        query_row: [H_q, D], the sequence's decode query.
        visual_keys: [H_kv, N_v, D], the sequence's visual keys.
        lse_all: [H_q] float32, log-sum-exp of the query's logits over all its keys at τ = 1
            (only used when ``score`` is ``"probs"``).
        scale: logit scale.
        score: ``"logits"`` (head-mean logits) or ``"probs"`` (head-mean probabilities).
    """
    logits = row_logits(query_row[None], visual_keys[None], scale)[0]  # [H_q, N_v] float32
    if score == "logits":
        return logits.mean(dim=0)
    return torch.exp(logits - lse_all[:, None]).mean(dim=0)


def anchor_select(query: torch.Tensor, key: torch.Tensor, layout: KeyLayout, rule: BudgetRule, *, scale: float,
                  score: str = "logits") -> AnchorSelection:  # fmt: skip
    """The anchor layer's decision for one decode step, as :func:`vpstudy.backends.reference.anchor_select`.

    Args:
        query: [B, H_q, D] decode queries (after RoPE), float16 or bfloat16 on CUDA.
        key: [B, H_kv, T, D] the layer's cache, in the query's dtype.
        layout: where each sequence's keys and visual tokens are.
        rule: budget rule (its signal, τ, slope, intercept, clamps and rounding).
        scale: logit scale (usually D**-0.5).
        score: rank visual tokens by head-mean ``"logits"`` or ``"probs"`` (τ = 1).

    Raises:
        BackendUnavailable: xformers cannot run here (see :func:`unavailable_reason`).
        LayoutError: an unknown ``score``, or shapes, dtypes or a layout that do not fit.
    """
    if score not in SCORES:
        raise LayoutError(f"score must be one of {SCORES}, got {score!r}")
    check_decode_inputs(query, key, None, layout)
    _require(query, key)
    kind, tau = parse_signal(rule.signal)
    valid = layout.visual_index()[1]
    ranking = torch.zeros(valid.shape, dtype=torch.float32, device=query.device)
    shares, shares_tau = [], []
    for b, bounds in enumerate(_host_bounds(layout, key.shape[2])):
        share, share_tau, lse_all = _visual_shares(_query5(query[b], key.shape[1]), key[b], bounds, scale, tau)
        visual_start, visual_end = bounds[1], bounds[2]
        visual_keys = key[b, :, visual_start:visual_end]
        ranking[b, : visual_end - visual_start] = _ranking(query[b], visual_keys, lse_all, scale, score)
        shares.append(share)
        shares_tau.append(share_tau)
    head_mass_tau = torch.stack(shares_tau)  # [B, H_q]
    signal = head_mass_tau.mean(dim=1) if kind == "mass" else head_mass_tau.amax(dim=1)
    counts = rule_keep_counts(rule, signal, layout.visual_len.long())
    keep = top_counts_mask(ranking, counts, valid)
    return AnchorSelection(mass=torch.stack(shares).mean(dim=1), head_mass_tau=head_mass_tau, signal=signal.float(),
                           scores=ranking, kept=kept_from_mask(keep))  # fmt: skip
