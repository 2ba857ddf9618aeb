"""The Triton kernels of ``vpstudy.kernels`` against their pure-torch references, on random inputs
of several shapes: ragged batches (different padding, N_v and lengths per sequence), GQA groups
of 1, 2 and 4, head dims that are and are not powers of two, exact ties, token-exact and block
selections. Without CUDA they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py): the logic is tested here, speed only on a GPU (``vpstudy bench``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vpstudy.rules import BudgetRule
from vpstudy.backends import reference
from vpstudy.kernels import triton_unavailable_reason
from vpstudy.backends.layout import KeptSet, KeyLayout, LayoutError
from vpstudy.selection import top_counts_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNAVAILABLE = triton_unavailable_reason(DEVICE, torch.float32, 64)
if UNAVAILABLE is not None:
    pytest.skip(UNAVAILABLE, allow_module_level=True)

from vpstudy.kernels import anchor, sparse_decode  # noqa: E402  (after the skip: they import triton)

# (batch, query heads, KV heads, head dim, cache slots, layout rows: (start, end, visual start, N_v))
SHAPES = {
    "ragged-gqa4": (3, 8, 2, 32, 300, [(0, 300, 10, 200), (5, 250, 40, 150), (20, 280, 30, 237)]),
    "mha-d48": (2, 4, 4, 48, 160, [(0, 160, 3, 120), (17, 131, 20, 64)]),
    "gqa2-one-visual": (2, 6, 3, 64, 90, [(0, 90, 0, 1), (10, 70, 12, 57)]),
    "tail-slots": (1, 4, 1, 16, 257, [(0, 200, 1, 130)]),  # unwritten static-cache slots after `end`
}
RULES = {
    "paper-0.1": BudgetRule.paper(0.1, 0.01, 0.05),
    "paper-0.4-ceil": replace(BudgetRule.paper(0.4, 0.05, 0.3), rounding="ceil"),
    "fitted-mass": replace(BudgetRule.paper(0.1, 0.02, 0.6), signal="mass", slope=0.8, intercept=0.01),
}


def _inputs(name: str, dtype=torch.float32, seed: int = 0):
    batch, heads, kv_heads, dim, slots, rows = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, slots, dim, generator=g)
    v = torch.randn(batch, kv_heads, slots, dim, generator=g)
    layout = KeyLayout.build(*zip(*rows, strict=True), device=DEVICE)
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [layout, dim**-0.5]


def _kept_sets(kept: KeptSet) -> list[list[int]]:
    return [kept.index[b, : int(kept.count[b])].tolist() for b in range(kept.count.numel())]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("score", ["logits", "probs"])
def test_anchor_kernel_matches_the_reference(shape, rule, score):
    q, k, _, layout, scale = _inputs(shape)
    ref = reference.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    got = anchor.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    torch.testing.assert_close(got.mass, ref.mass, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.head_mass_tau, ref.head_mass_tau, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.signal, ref.signal, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.kept.count, ref.kept.count)
    # the kept set is exactly the top-K of the kernel's own scores (ties to the lower index) ...
    valid = layout.visual_index()[1]
    own = reference.kept_from_mask(top_counts_mask(got.scores, got.kept.count.long(), valid))
    assert _kept_sets(got.kept) == _kept_sets(own)
    # ... and the reference's, unless two scores at the K-th boundary are within float error
    for b, (mine, theirs) in enumerate(zip(_kept_sets(got.kept), _kept_sets(ref.kept), strict=True)):
        if mine != theirs:
            ranked = ref.scores[b, : int(layout.visual_len[b])].sort(descending=True).values
            n = int(ref.kept.count[b])
            assert (ranked[n - 1] - ranked[n]).abs() < 1e-5, (b, mine, theirs)


def test_anchor_kernel_breaks_exact_ties_towards_the_lower_index():
    q, k, _, layout, scale = _inputs("ragged-gqa4")
    # zero keys: q·k is exactly 0 whatever the summation order (equal non-zero keys need not give
    # bit-equal dot products: the interpreter's BLAS rounds by position within a tile on some CPUs)
    k[:, :, 10:210] = 0.0  # sequence 0's visual keys all equal: every score ties
    k[1, :, 40:190:2] = 0.0  # half of sequence 1's tie
    rule = BudgetRule.paper(0.1, 0.2, 0.2)
    ref = reference.anchor_select(q, k, layout, rule, scale=scale)
    got = anchor.anchor_select(q, k, layout, rule, scale=scale)
    assert _kept_sets(got.kept) == _kept_sets(ref.kept)
    assert _kept_sets(got.kept)[0] == list(range(40))  # K = 0.2 · 200, the first 40


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["dense", "token", "block-16", "block-64"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_sparse_decode_kernel_matches_the_reference(shape, selection, splits):
    q, k, v, layout, scale = _inputs(shape, seed=1)
    kept = None
    if selection != "dense":
        kept = reference.anchor_select(q, k, layout, BudgetRule.paper(0.1, 0.05, 0.3), scale=scale).kept
        if selection.startswith("block"):
            kept = reference.block_cover(kept, layout.visual_len, int(selection.split("-")[1]))
    ref, ref_lse = reference.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True)
    got, got_lse = sparse_decode.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True, splits=splits)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_lse, ref_lse, atol=2e-6, rtol=1e-5)


def test_block_cover_keeps_every_token_of_the_rule_and_reports_its_retention():
    q, k, _, layout, scale = _inputs("ragged-gqa4")
    kept = reference.anchor_select(q, k, layout, BudgetRule.paper(0.1, 0.05, 0.05), scale=scale).kept
    cover = reference.block_cover(kept, layout.visual_len, 64)
    width = layout.visual_width
    tokens, covered = kept.token_mask(layout.visual_len, width), cover.token_mask(layout.visual_len, width)
    assert (covered | ~tokens).all() and (covered.sum(-1) >= tokens.sum(-1)).all()
    assert torch.equal(cover.kept_tokens(layout.visual_len), covered.sum(-1))
    assert (cover.kept_tokens(layout.visual_len) <= 64 * cover.count).all()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bfloat16 kernels need CUDA (the interpreter computes through numpy)")
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_in_bfloat16_agree_with_the_float32_reference(shape):
    q, k, v, layout, scale = _inputs(shape, dtype=torch.bfloat16, seed=2)
    rule = BudgetRule.paper(0.1, 0.01, 0.05)
    ref = reference.anchor_select(q, k, layout, rule, scale=scale)
    got = anchor.anchor_select(q, k, layout, rule, scale=scale)
    torch.testing.assert_close(got.mass, ref.mass, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(got.scores, ref.scores, atol=2e-2, rtol=1e-2)
    out = sparse_decode.sparse_decode(q, k, v, layout, got.kept, scale=scale)
    torch.testing.assert_close(out.float(), reference.sparse_decode(q, k, v, layout, got.kept, scale=scale).float(),
                               atol=2e-2, rtol=2e-2)  # fmt: skip


def test_bad_shapes_are_one_line_errors():
    q, k, v, layout, scale = _inputs("mha-d48")
    rule = BudgetRule.paper(0.1, 0.01, 0.05)
    with pytest.raises(LayoutError, match=r"query heads \(4\) are not a multiple of key-value heads \(3\)"):
        anchor.anchor_select(q, k[:, :3], layout, rule, scale=scale)
    with pytest.raises(LayoutError, match="layout describes 2 sequences, the query has 1"):
        sparse_decode.sparse_decode(q[:1], k[:1], v[:1], layout, None, scale=scale)
    with pytest.raises(LayoutError, match="value shape"):
        sparse_decode.sparse_decode(q, k, v[:, :, :5], layout, None, scale=scale)
    with pytest.raises(LayoutError, match="start <= visual_start fails for sequence"):
        KeyLayout.build([0, 30], [160, 131], [3, 20], [120, 64]).check(160)
