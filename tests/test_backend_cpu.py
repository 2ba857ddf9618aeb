"""The CPU decode backend (``vpstudy.backends.cpu``) against the pure-torch reference, on the
shapes the Triton kernels are tested on: ragged batches (padding, N_v, lengths and unwritten
tail slots differing per sequence), GQA groups 1/2/4, head dims 16 to 64, three budget rules,
both rankings, exact ties, token and block selections; and what it must not read."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vpstudy.backends import cpu, reference
from vpstudy.backends.choose import choose_backend
from vpstudy.backends.layout import KeptSet, KeyLayout, LayoutError
from vpstudy.rules import BudgetRule

# (batch, query heads, KV heads, head dim, cache slots, layout rows: (start, end, visual start, N_v))
SHAPES = {
    "ragged-gqa4": (3, 8, 2, 32, 300, [(0, 300, 10, 200), (5, 250, 40, 150), (20, 280, 30, 237)]),
    "mha-d48": (2, 4, 4, 48, 160, [(0, 160, 3, 120), (17, 131, 20, 64)]),
    "gqa2-one-visual": (2, 6, 3, 64, 90, [(0, 90, 0, 1), (10, 70, 12, 57)]),
    "tail-slots": (1, 4, 1, 16, 257, [(0, 200, 1, 130)]),  # unwritten static-cache slots after `end`
    "no-text-after": (2, 4, 2, 32, 120, [(0, 100, 4, 96), (8, 120, 10, 110)]),  # the image ends the prompt
}
RULES = {
    "paper-0.1": BudgetRule.paper(0.1, 0.01, 0.05),
    "paper-0.4-ceil": replace(BudgetRule.paper(0.4, 0.05, 0.3), rounding="ceil"),
    "fitted-mass": replace(BudgetRule.paper(0.1, 0.02, 0.6), signal="mass", slope=0.8, intercept=0.01),
}


def _inputs(name: str, seed: int = 0):
    batch, heads, kv_heads, dim, slots, rows = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, slots, dim, generator=g)
    v = torch.randn(batch, kv_heads, slots, dim, generator=g)
    return q, k, v, KeyLayout.build(*zip(*rows, strict=True)), dim**-0.5


def _kept_sets(kept: KeptSet) -> list[list[int]]:
    return [kept.index[b, : int(kept.count[b])].tolist() for b in range(kept.count.numel())]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("score", ["logits", "probs"])
def test_anchor_select_matches_the_reference(shape, rule, score):
    q, k, _, layout, scale = _inputs(shape)
    ref = reference.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    got = cpu.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    for name in ("mass", "head_mass_tau", "signal", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=2e-6, rtol=1e-5)
    assert torch.equal(got.kept.count, ref.kept.count)
    assert _kept_sets(got.kept) == _kept_sets(ref.kept)


def test_top_k_breaks_exact_ties_towards_the_lower_index_like_a_stable_sort():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (4, 50), generator=g).float()  # many exact ties at every boundary
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[1, 37:] = False
    valid[3, 1:] = False
    counts = torch.tensor([1, 20, 50, 1])
    kept = cpu.top_k_kept(scores, counts, valid)
    # the oracle: a stable descending sort, the first counts[b] valid entries (ties to the lower index)
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    expected = [sorted(order[b, : int(counts[b])].tolist()) for b in range(4)]
    assert _kept_sets(kept) == expected and kept.count.tolist() == [1, 20, 50, 1]
    q, k, _, layout, scale = _inputs("ragged-gqa4")
    k[:, :, 10:210] = 0.0  # sequence 0's visual keys all equal: every score ties
    got = cpu.anchor_select(q, k, layout, BudgetRule.paper(0.1, 0.2, 0.2), scale=scale)
    assert _kept_sets(got.kept)[0] == list(range(40))  # K = 0.2 · 200, the first 40


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["dense", "token", "block-16", "block-64"])
def test_sparse_decode_matches_the_reference(shape, selection):
    q, k, v, layout, scale = _inputs(shape, seed=1)
    kept = None
    if selection != "dense":
        kept = reference.anchor_select(q, k, layout, BudgetRule.paper(0.1, 0.05, 0.3), scale=scale).kept
        if selection.startswith("block"):
            kept = reference.block_cover(kept, layout.visual_len, int(selection.split("-")[1]))
    ref, ref_lse = reference.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True)
    got, got_lse = cpu.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True)  # explicit logits
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_lse, ref_lse, atol=2e-6, rtol=1e-5)
    fused = cpu.sparse_decode(q, k, v, layout, kept, scale=scale)  # one scaled_dot_product_attention call
    torch.testing.assert_close(fused, ref, atol=2e-6, rtol=1e-5)


def test_hidden_and_unwritten_slots_are_never_read():
    """NaN in every slot a step must not read (left padding, hidden visual keys, the unwritten
    tail): the CPU backend's outputs stay finite and equal the reference's on clean inputs."""
    q, k, v, layout, scale = _inputs("ragged-gqa4", seed=2)
    rule = BudgetRule.paper(0.1, 0.05, 0.3)
    selection = reference.anchor_select(q, k, layout, rule, scale=scale)
    expected = reference.sparse_decode(q, k, v, layout, selection.kept, scale=scale)
    attended = reference.attended_slots(layout, selection.kept, k.shape[2])  # [B, T]
    poisoned_k = k.masked_fill(~attended[:, None, :, None], float("nan"))
    poisoned_v = v.masked_fill(~attended[:, None, :, None], float("nan"))
    got = cpu.sparse_decode(q, poisoned_k, poisoned_v, layout, selection.kept, scale=scale)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    # the anchor's decision does not depend on any slot outside a row's [start, end)
    outside = ~layout.key_mask(k.shape[2])
    anchored = cpu.anchor_select(q, k.masked_fill(outside[:, None, :, None], float("nan")), layout, rule, scale=scale)
    assert _kept_sets(anchored.kept) == _kept_sets(selection.kept)
    torch.testing.assert_close(anchored.signal, selection.signal, atol=2e-6, rtol=1e-5)


def test_auto_is_the_cpu_backend_without_cuda_and_bad_layouts_are_one_line_errors():
    assert choose_backend("auto", torch.device("cpu"), torch.float32, 64).name == "cpu"
    assert choose_backend("cpu", torch.device("cpu"), torch.bfloat16, 64).name == "cpu"
    q, k, v, layout, scale = _inputs("mha-d48")
    with pytest.raises(LayoutError, match=r"query heads \(4\) are not a multiple of key-value heads \(3\)"):
        cpu.anchor_select(q, k[:, :3], layout, BudgetRule.paper(0.1, 0.01, 0.05), scale=scale)
    with pytest.raises(LayoutError, match=r"slots \[0, 160\) do not fit a cache of 100 slots"):
        cpu.sparse_decode(q, k[:, :, :100], v[:, :, :100], layout, None, scale=scale)
    with pytest.raises(LayoutError, match="score must be one of"):
        cpu.anchor_select(q, k, layout, BudgetRule.paper(0.1, 0.01, 0.05), scale=scale, score="mean")


@pytest.mark.parametrize("written", [None, 41])
def test_gather_slots_takes_the_rows_torch_gather_takes(written):
    """On a whole cache, on the written part of a static one (a strided view), and on a layout it
    cannot read as a table of rows (heads transposed)."""
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(3, 4, 64, 16, generator=g)
    states = cache if written is None else cache[:, :, :written]
    index = torch.randint(0, states.shape[2], (3, 9), generator=g)
    expected = states.gather(2, index[:, None, :, None].expand(3, 4, 9, 16))
    assert torch.equal(cpu.gather_slots(states, index), expected)
    odd = torch.randn(3, 64, 4, 16, generator=g).transpose(1, 2)
    assert torch.equal(cpu.gather_slots(odd, index), odd.gather(2, index[:, None, :, None].expand(3, 4, 9, 16)))
