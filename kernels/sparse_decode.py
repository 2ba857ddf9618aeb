"""Decode attention over the non-visual keys plus a per-sequence subset of visual keys (Triton).

Each sequence attends to a *virtual* key list read in place from the cache: its non-visual
keys before the image (slots ``[start, visual_start)``), its kept visual keys
(``visual_start + kept[j]``, token-exact, or whole blocks of ``kept.block`` tokens), and its
non-visual keys after the image (``[visual_end, end)``). Nothing is gathered into a copy and
no mask is built; a hidden key is never read.

Split-K ("flash decoding"): grid (B · H_kv, splits). A program takes one slice of its
sequence's virtual list for all query heads of its KV head (GQA: one read of each key serves the
whole group), keeps an online softmax in float32 and writes a partial output and its
log-sum-exp; ``_combine`` merges the splits. Reference:
:func:`vpstudy.backends.reference.sparse_decode`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vpstudy.backends.layout import KeptSet, KeyLayout, LayoutError, check_decode_inputs

from . import BLOCK_H, interpreting, pow2_at_least

BLOCK_N = 64  # keys per iteration
LOG2E = 1.4426950408889634


@triton.jit
def _sparse_partial(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, vstart_ptr, vlen_ptr, kept_ptr, count_ptr,
                    out_ptr, lse_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                    stride_vt, stride_kept, qk_scale, n_splits,
                    H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK: tl.constexpr, KEPT_BLOCK: tl.constexpr, DENSE: tl.constexpr,
                    PRECISION: tl.constexpr):  # fmt: skip
    pid, split = tl.program_id(0), tl.program_id(1)
    b, kv_head = pid // H_KV, pid % H_KV
    start, end = tl.load(start_ptr + b), tl.load(end_ptr + b)
    vstart, n_visual = tl.load(vstart_ptr + b), tl.load(vlen_ptr + b)
    before = vstart - start
    if DENSE:
        middle = n_visual
    else:
        middle = tl.load(count_ptr + b) * KEPT_BLOCK
    n_keys = before + middle + (end - vstart - n_visual)
    per_split = tl.cdiv(tl.cdiv(n_keys, n_splits), BLOCK) * BLOCK
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)

    offs_g, offs_d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    heads = kv_head * G + offs_g
    g_ok, d_ok = offs_g < G, offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    for j0 in range(lo, hi, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < hi
        in_before = j < before
        in_middle = (j >= before) & (j < before + middle)
        rel = j - before
        if DENSE:
            slot_middle = vstart + rel
        else:
            entry = tl.load(kept_ptr + b * stride_kept + rel // KEPT_BLOCK, mask=ok & in_middle, other=0)
            token = entry * KEPT_BLOCK + rel % KEPT_BLOCK
            ok = ok & (~in_middle | (token < n_visual))  # the last block of a sequence is cut at N_v
            slot_middle = vstart + token
        slot = tl.where(in_before, start + j, tl.where(in_middle, slot_middle, vstart + n_visual + rel - middle))
        k = tl.load(k_base + slot[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # base-2 logits [G_PAD, BLOCK]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    n_heads = H_KV * G
    row = (b * n_heads + heads) * n_splits + split
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + row[:, None] * D_PAD + offs_d[None, :], acc / l_safe[:, None], mask=g_ok[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))  # natural log units
    tl.store(lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _combine(part_ptr, part_lse_ptr, out_ptr, lse_ptr, stride_ob, stride_oh, n_splits,
             H: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    offs_s, offs_d = tl.arange(0, S_PAD), tl.arange(0, D_PAD)
    s_ok = offs_s < n_splits
    lse = tl.load(part_lse_ptr + pid * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    part = tl.load(part_ptr + (pid * n_splits + offs_s)[:, None] * D_PAD + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)
    tl.store(lse_ptr + pid, tl.where(total > 0, m_safe + tl.log(total), float("-inf")))



def default_splits(batch: int, kv_heads: int, n_slots: int, device: torch.device) -> int:
    """Splits of each sequence's keys: enough programs for about four per streaming multiprocessor
    (four in the interpreter), never more than there are key blocks."""
    if device.type == "cuda" and not interpreting():
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4 * batch * kv_heads
    return max(1, min(math.ceil(target / (batch * kv_heads)), triton.cdiv(n_slots, BLOCK_N)))


def sparse_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: KeyLayout,
                  kept: KeptSet | None, *, scale: float, return_lse: bool = False,
                  splits: int | None = None):  # fmt: skip
    """Decode attention over the non-visual keys and the kept visual keys (Triton); arguments and
    result as :func:`vpstudy.backends.reference.sparse_decode`. ``splits``: key splits per
    sequence (default :func:`default_splits`)."""
    check_decode_inputs(query, key, value, layout)
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise LayoutError("query, key and value need a contiguous last (head-dim) axis")
    if not query.dtype == key.dtype == value.dtype:
        raise LayoutError(f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    if kept is not None and (kept.index.dtype != torch.int32 or kept.index.stride(-1) != 1):
        raise LayoutError("kept.index must be int32 with a contiguous last axis")
    batch, heads, dim = query.shape
    kv_heads, n_slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    n_splits = splits or default_splits(batch, kv_heads, n_slots, query.device)
    d_pad = pow2_at_least(dim, 16)
    part = torch.empty(batch * heads * n_splits, d_pad, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch * heads * n_splits, dtype=torch.float32, device=query.device)
    out = torch.empty_like(query)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=query.device)
    index = kept.index if kept is not None else layout.visual_len  # unused when dense
    count = kept.count if kept is not None else layout.visual_len
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _sparse_partial[(batch * kv_heads, n_splits)](
        query, key, value, layout.start, layout.end, layout.visual_start, layout.visual_len, index, count, part,
        part_lse, query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0),
        value.stride(1), value.stride(2), index.stride(0), float(scale) * LOG2E, n_splits, H_KV=kv_heads, G=group,
        G_PAD=pow2_at_least(group, BLOCK_H), D=dim, D_PAD=d_pad, BLOCK=BLOCK_N, KEPT_BLOCK=kept.block if kept else 1,
        DENSE=kept is None, PRECISION=precision)  # fmt: skip
    _combine[(batch * heads,)](part, part_lse, out, lse, out.stride(0), out.stride(1), n_splits, H=heads,
                               S_PAD=pow2_at_least(n_splits), D=dim, D_PAD=d_pad)  # fmt: skip
    return (out, lse) if return_lse else out
