"""The anchor layer's decision in one pass over the keys (Triton): per-head visual mass at τ, the
budget, the head-mean visual scores and the top-K kept indices of every sequence.

Two launches, no host synchronisation between them:

1. ``_anchor_partials`` — grid (B · H_kv, key blocks). Each program reads one block of keys
   once for all query heads of its KV head (GQA) and writes (a) the logits of the visual keys
   in the block and (b) per head, the running max and sum of exponentials of the block's logits
   over all visible keys and over visual keys, at temperature 1 and at τ. No probability
   matrix is formed.
2. ``_anchor_select`` — grid (B,). Each program merges its sequence's block statistics into
   log-sum-exps, so share_h(τ) = exp(lse_visual_h(τ) − lse_all_h(τ)); evaluates the budget rule
   (in float64, the reference's arithmetic) to get K; writes the ranking scores; finds the K-th
   largest score exactly by bisection on the scores' order-preserving integer keys; and writes
   the kept indices in ascending order, ties to the lower index (the reference's stable sort).

Reference: :func:`vpstudy.backends.reference.anchor_select`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpstudy.backends.layout import AnchorSelection, KeptSet, KeyLayout, LayoutError, check_decode_inputs
from vpstudy.backends.reference import SCORES
from vpstudy.rules import BudgetRule, parse_signal

from . import BLOCK_H, pow2_at_least

BLOCK_N = 64  # keys per program of the first pass
BLOCK_C = 64  # key blocks merged per iteration of the second pass
BLOCK_V = 128  # visual tokens per iteration when scoring
BLOCK_K = 1024  # visual tokens per iteration when counting and compacting


@triton.jit
def _block_stats(s, ok, inv_temperature):
    """Max and sum of exp over the keys where ``ok``, per query-head row of ``s``."""
    x = tl.where(ok, s * inv_temperature, float("-inf"))
    m = tl.max(x, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(tl.exp(x - m_safe[:, None]), 1)


@triton.jit
def _anchor_partials(q_ptr, k_ptr, start_ptr, end_ptr, vstart_ptr, vlen_ptr, logits_ptr, stats_ptr,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, scale, inv_tau, width, n_blocks,
                     H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    pid, blk = tl.program_id(0), tl.program_id(1)
    b, kv_head = pid // H_KV, pid % H_KV
    start, end = tl.load(start_ptr + b), tl.load(end_ptr + b)
    vstart = tl.load(vstart_ptr + b)
    vend = vstart + tl.load(vlen_ptr + b)
    offs_g, offs_d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    heads = kv_head * G + offs_g
    g_ok, d_ok = offs_g < G, offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    live = (offs_n >= start) & (offs_n < end)
    k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=live[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK] float32
    visual = live & (offs_n >= vstart) & (offs_n < vend)
    n_heads = H_KV * G
    tl.store(logits_ptr + (b * n_heads + heads[:, None]) * width + (offs_n - vstart)[None, :], s,
             mask=g_ok[:, None] & visual[None, :])  # fmt: skip
    base = stats_ptr + ((b * n_heads + heads) * n_blocks + blk) * 8
    m, e = _block_stats(s, live[None, :], 1.0)
    tl.store(base + 0, m, mask=g_ok)
    tl.store(base + 1, e, mask=g_ok)
    m, e = _block_stats(s, visual[None, :], 1.0)
    tl.store(base + 2, m, mask=g_ok)
    tl.store(base + 3, e, mask=g_ok)
    m, e = _block_stats(s, live[None, :], inv_tau)
    tl.store(base + 4, m, mask=g_ok)
    tl.store(base + 5, e, mask=g_ok)
    m, e = _block_stats(s, visual[None, :], inv_tau)
    tl.store(base + 6, m, mask=g_ok)
    tl.store(base + 7, e, mask=g_ok)


@triton.jit
def _merge_stats(m_run, s_run, ptr, msk):
    """Fold a tile of block statistics (max at ``ptr``, sum at ``ptr + 1``) into running ones."""
    m = tl.load(ptr, mask=msk, other=float("-inf"))
    s = tl.load(ptr + 1, mask=msk, other=0.0)
    m_new = tl.maximum(m_run, tl.max(m, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s_run * tl.exp(m_run - m_safe) + tl.sum(s * tl.exp(m - m_safe[:, None]), 1)
    return m_new, s_new


@triton.jit
def _count_at_least(keys_ptr, n, threshold, BLOCK: tl.constexpr):
    total = 0
    for v0 in range(0, n, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + offs, mask=offs < n, other=0)
        total += tl.sum(((offs < n) & (key >= threshold)).to(tl.int32), 0)
    return total


@triton.jit
def _anchor_select(stats_ptr, logits_ptr, vlen_ptr, mass_ptr, head_tau_ptr, signal_ptr, scores_ptr, keys_ptr,
                   kept_ptr, count_ptr, n_blocks, width, intercept, slope, b_min, b_max,
                   H: tl.constexpr, H_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr, SIGNAL_MEAN: tl.constexpr, SCORE_PROBS: tl.constexpr,
                   CEIL: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    n_visual = tl.load(vlen_ptr + b)
    offs_h = tl.arange(0, H_PAD)
    h_ok = offs_h < H
    # -- log-sum-exps per head: all keys and visual keys, at τ = 1 and at τ
    ninf = tl.full((H_PAD,), float("-inf"), tl.float32)
    zero = tl.zeros((H_PAD,), tl.float32)
    m_a1, s_a1, m_v1, s_v1, m_at, s_at, m_vt, s_vt = ninf, zero, ninf, zero, ninf, zero, ninf, zero
    for c0 in range(0, n_blocks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        msk = h_ok[:, None] & (offs_c < n_blocks)[None, :]
        ptr = stats_ptr + ((b * H + offs_h[:, None]) * n_blocks + offs_c[None, :]) * 8
        m_a1, s_a1 = _merge_stats(m_a1, s_a1, ptr + 0, msk)
        m_v1, s_v1 = _merge_stats(m_v1, s_v1, ptr + 2, msk)
        m_at, s_at = _merge_stats(m_at, s_at, ptr + 4, msk)
        m_vt, s_vt = _merge_stats(m_vt, s_vt, ptr + 6, msk)
    lse_all = m_a1 + tl.log(s_a1)
    share = tl.where(h_ok, tl.exp(m_v1 + tl.log(s_v1) - lse_all), 0.0)
    share_tau = tl.where(h_ok, tl.exp(m_vt + tl.log(s_vt) - (m_at + tl.log(s_at))), 0.0)
    tl.store(head_tau_ptr + b * H + offs_h, share_tau, mask=h_ok)
    tl.store(mass_ptr + b, tl.sum(share, 0) / H)
    if SIGNAL_MEAN:
        signal = tl.sum(share_tau, 0) / H
    else:
        signal = tl.max(tl.where(h_ok, share_tau, -1.0), 0)
    tl.store(signal_ptr + b, signal)
    # -- the budget, in float64 as the reference computes it
    ratio = tl.minimum(tl.maximum(intercept + slope * signal.to(tl.float64), b_min), b_max)
    raw = ratio * n_visual.to(tl.float64)
    if CEIL:
        k = tl.ceil(raw - 1e-9).to(tl.int32)
    else:
        k = tl.floor(raw + 1e-9).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 1), n_visual)
    tl.store(count_ptr + b, k)
    # -- ranking scores and their order-preserving integer keys
    for v0 in range(0, n_visual, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < n_visual
        logit = tl.load(logits_ptr + (b * H + offs_h[:, None]) * width + offs_v[None, :],
                        mask=h_ok[:, None] & v_ok[None, :], other=0.0)  # fmt: skip
        if SCORE_PROBS:
            score = tl.sum(tl.where(h_ok[:, None], tl.exp(logit - lse_all[:, None]), 0.0), 0) / H
        else:
            score = tl.sum(logit, 0) / H
        score = score + 0.0  # -0.0 -> +0.0: the reference treats them as equal
        tl.store(scores_ptr + b * width + offs_v, score, mask=v_ok)
        bits = score.to(tl.int32, bitcast=True)
        tl.store(keys_ptr + b * width + offs_v, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), mask=v_ok)
    tl.debug_barrier()
    # -- the K-th largest key: the largest t with #{key >= t} >= K (bisection over int32)
    keys = keys_ptr + b * width
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = _count_at_least(keys, n_visual, mid, BLOCK_K) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    threshold = lo
    need_ties = k - _count_at_least(keys, n_visual, threshold + 1, BLOCK_K)
    # -- compaction: every key above the threshold, and the first ``need_ties`` equal to it
    taken = 0
    ties = 0
    for v0 in range(0, n_visual, BLOCK_K):
        offs = v0 + tl.arange(0, BLOCK_K)
        ok = offs < n_visual
        key = tl.load(keys + offs, mask=ok, other=0).to(tl.int64)
        tie = (ok & (key == threshold)).to(tl.int32)
        chosen = (ok & (key > threshold)) | ((tie > 0) & (ties + tl.cumsum(tie, 0) - tie < need_ties))
        chosen_i = chosen.to(tl.int32)
        tl.store(kept_ptr + b * width + taken + tl.cumsum(chosen_i, 0) - chosen_i, offs, mask=chosen)
        taken += tl.sum(chosen_i, 0)
        ties += tl.sum(tie, 0)



def anchor_select(query: torch.Tensor, key: torch.Tensor, layout: KeyLayout, rule: BudgetRule, *, scale: float,
                  score: str = "logits") -> AnchorSelection:  # fmt: skip
    """The anchor layer's decision (Triton); arguments and result as
    :func:`vpstudy.backends.reference.anchor_select`."""
    if score not in SCORES:
        raise LayoutError(f"score must be one of {SCORES}, got {score!r}")
    check_decode_inputs(query, key, None, layout)
    if key.stride(-1) != 1 or query.stride(-1) != 1:
        raise LayoutError("query and key need a contiguous last (head-dim) axis")
    if query.dtype != key.dtype:
        raise LayoutError(f"query dtype {query.dtype} differs from key dtype {key.dtype}")
    batch, heads, dim = query.shape
    kv_heads, n_slots = key.shape[1], key.shape[2]
    width = layout.visual_width
    kind, tau = parse_signal(rule.signal)
    n_blocks = triton.cdiv(n_slots, BLOCK_N)
    device = query.device
    f32 = dict(dtype=torch.float32, device=device)
    logits = torch.empty(batch, heads, width, **f32)
    stats = torch.empty(batch, heads, n_blocks, 8, **f32)
    mass, signal = torch.empty(batch, **f32), torch.empty(batch, **f32)
    head_tau = torch.empty(batch, heads, **f32)
    scores = torch.zeros(batch, width, **f32)
    keys = torch.empty(batch, width, dtype=torch.int32, device=device)
    kept = torch.zeros(batch, width, dtype=torch.int32, device=device)
    count = torch.empty(batch, dtype=torch.int32, device=device)
    group = heads // kv_heads
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _anchor_partials[(batch * kv_heads, n_blocks)](
        query, key, layout.start, layout.end, layout.visual_start, layout.visual_len, logits, stats,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), float(scale), 1.0 / tau,
        width, n_blocks, H_KV=kv_heads, G=group, G_PAD=pow2_at_least(group, BLOCK_H), D=dim,
        D_PAD=pow2_at_least(dim, 16), BLOCK=BLOCK_N, PRECISION=precision)  # fmt: skip
    _anchor_select[(batch,)](
        stats, logits, layout.visual_len, mass, head_tau, signal, scores, keys, kept, count, n_blocks, width,
        float(rule.intercept), float(rule.slope), float(rule.b_min), float(rule.b_max), H=heads,
        H_PAD=pow2_at_least(heads), BLOCK_C=BLOCK_C, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K, SIGNAL_MEAN=kind == "mass",
        SCORE_PROBS=score == "probs", CEIL=rule.rounding == "ceil")  # fmt: skip
    return AnchorSelection(mass=mass, head_mass_tau=head_tau, signal=signal, scores=scores,
                           kept=KeptSet(kept, count))  # fmt: skip
