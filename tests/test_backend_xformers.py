"""The xformers decode backend (``vpstudy.backends.xformers``) against the pure-torch reference.

xformers runs nothing on a CPU, so on CPU (CI) ``xformers.ops.fmha`` is replaced by fakes of its
two operations, ``memory_efficient_attention_partial`` and ``merge_attentions``, written from
xformers 0.0.35's own contract (cited beside each). They test the backend's logic: segment
splitting, the BMGHK layout of GQA, the log-sum-exp arithmetic of the masses, τ, the gathering of
kept keys (tokens and blocks) and ragged batches. On a machine with CUDA the real xformers runs
against the reference in bfloat16, and the fakes against the real operations."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch

from vpstudy.backends import BackendUnavailable
from vpstudy.backends import xformers as xf
from vpstudy.rules import BudgetRule
from vpstudy.backends import reference
from vpstudy.backends.layout import AnchorSelection, KeptSet, KeyLayout, LayoutError


def _random_rows(seed: int, batch: int) -> list[tuple[int, int, int, int]]:
    """Ragged layout rows (start, end, visual start, N_v): left padding, non-visual keys before
    and after the image (at least one after) and unwritten slots differ per sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        start, before, n_v, after = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in
                                     ((0, 5), (0, 9), (1, 40), (1, 9)))  # fmt: skip
        rows.append((start, start + before + n_v + after, start + before, n_v))
    return rows


# (query heads, KV heads, head dim, cache slots, layout rows: (start, end, visual start, N_v))
SHAPES = {
    "ragged-gqa4": (8, 2, 16, 64, [(0, 40, 0, 12), (5, 64, 9, 30), (2, 30, 10, 7)]),  # no prefix; full; tail
    "mha-no-suffix": (4, 4, 16, 48, [(0, 14, 4, 10), (3, 40, 3, 25)]),  # row 0's image ends its keys
    "gqa2-one-visual": (6, 3, 8, 20, [(0, 20, 0, 1), (4, 18, 6, 9)]),
    "random-gqa4": (8, 2, 32, 70, _random_rows(7, 4)),
}
# for the real xformers on CUDA, bf16 inputs of model-like size: (query heads, KV heads, head dim, cache slots, rows)
REAL_SHAPES = {
    "gqa4": (8, 2, 128, 800, [(0, 700, 35, 576), (12, 800, 20, 600), (40, 500, 41, 300)]),
    "mha": (4, 4, 64, 640, [(0, 640, 10, 400), (3, 420, 3, 380)]),
}
RULES = {
    "paper-0.1": BudgetRule.paper(0.1, 0.01, 0.05),
    "paper-0.4-ceil": replace(BudgetRule.paper(0.4, 0.05, 0.3), rounding="ceil"),
    "fitted-mass": replace(BudgetRule.paper(0.1, 0.02, 0.6), signal="mass", slope=0.8, intercept=0.01),
}
SCORES = ("logits", "probs")


def _inputs(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(query [B, H_q, D], key, value [B, H_kv, T, D], layout, scale) for a shape of SHAPES or REAL_SHAPES."""
    heads, kv_heads, dim, slots, rows = (SHAPES | REAL_SHAPES)[name]
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(len(rows), heads, dim, generator=g)  # peaked rows: shares far from N_v / T
    k = torch.randn(len(rows), kv_heads, slots, dim, generator=g)
    v = torch.randn(len(rows), kv_heads, slots, dim, generator=g)
    layout = KeyLayout.build(*zip(*rows, strict=True), device=device)
    return [x.to(device, dtype) for x in (q, k, v)] + [layout, dim**-0.5]


def _kept_sets(kept: KeptSet, layout: KeyLayout) -> list[list[int]]:
    """Each sequence's kept visual tokens (blocks expanded)."""
    mask = kept.token_mask(layout.visual_len, int(layout.visual_len.max()))
    return [row.nonzero().flatten().tolist() for row in mask.cpu()]


# ---------------------------------------------------------------------------------------------
# fakes of xformers.ops.fmha (xformers 0.0.35, site-packages/xformers/ops/fmha/...)


class FakeFmha:
    """``memory_efficient_attention_partial`` and ``merge_attentions`` in float32 torch, with the
    input checks xformers makes on what this backend passes; ``calls`` records each partial
    attention's (query, key, value)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def memory_efficient_attention_partial(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                           output_dtype=None):  # fmt: skip
        # signature: fmha/__init__.py:597-607
        assert attn_bias is None and p == 0.0 and op is None
        # BMGHK for GQA, no broadcasting (the caller expands): fmha/__init__.py:264-291 (docstring),
        # common.py:208-325 (Inputs.validate_inputs: same ndim, same dtype, equal shapes)
        assert query.ndim == key.ndim == value.ndim == 5
        batch, n_q, groups, heads, dim = query.shape
        assert key.shape == value.shape and key.shape[0] == batch and key.shape[2:] == (groups, heads, dim)
        assert query.dtype == key.dtype == value.dtype
        for name, x in (("query", query), ("key", key), ("value", value)):
            # last dim contiguous: common.py:578-594 (check_lastdim_alignment_stride1)
            assert x.stride(-1) == 1, name
            # G/H foldable: flash.py:519-533 (_check_strides_for_bmghk); a group's KV head repeats with stride 0
            assert x.shape[3] == 1 or x.stride(3) == 0 or x.stride(2) == x.stride(3) * heads, name
        assert key.shape[1] >= 1  # the backend never passes an empty segment (its own rule, not xformers')
        self.calls.append((query, key, value))
        scale = dim**-0.5 if scale is None else scale  # common.py:163-165 (Inputs.scale_float)
        logits = torch.einsum("bmghd,bnghd->bghmn", query.float(), key.float()) * scale
        lse = torch.logsumexp(logits, dim=-1)  # [B, G, H, M]: fmha/__init__.py:656-665, flash.py:543-546
        out = torch.einsum("bghmn,bnghd->bmghd", torch.softmax(logits, dim=-1), value.float())
        # a partial attention's output is float32 by default: common.py:327-332 (Inputs.get_output_dtype)
        return out.to(output_dtype or torch.float32), lse

    def merge_attentions(self, attn_split, lse_split, write_lse=True, output_dtype=None):
        # signature, shapes and formula: fmha/__init__.py:638-665; list inputs: fmha/__init__.py:715-768
        assert isinstance(attn_split, list) and isinstance(lse_split, list) and len(attn_split) == len(lse_split)
        batch, n_q, groups, heads, dim = attn_split[0].shape
        for attn, lse in zip(attn_split, lse_split, strict=True):
            assert attn.shape == (batch, n_q, groups, heads, dim) and lse.shape == (batch, groups, heads, n_q)
        lse_out = torch.logsumexp(torch.stack(lse_split), dim=0)  # log(exp(LSE1) + exp(LSE2) + ...)
        weights = [torch.exp(lse - lse_out).permute(0, 3, 1, 2)[..., None] for lse in lse_split]  # [B, M, G, H, 1]
        out = sum(w * attn.float() for w, attn in zip(weights, attn_split, strict=True))
        # out in output_dtype or the inputs' dtype, lse in the inputs' lse dtype: fmha/__init__.py:770-804
        return out.to(output_dtype or attn_split[0].dtype), (lse_out.to(lse_split[0].dtype) if write_lse else None)


@pytest.fixture
def fake_fmha(monkeypatch: pytest.MonkeyPatch) -> FakeFmha:
    """Replace ``xformers.ops.fmha`` by :class:`FakeFmha` and let the backend run on CPU/float32."""
    fake = FakeFmha()
    module = types.ModuleType("xformers.ops.fmha")
    module.memory_efficient_attention_partial = fake.memory_efficient_attention_partial
    module.merge_attentions = fake.merge_attentions
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", module)
    monkeypatch.setattr(xf, "unavailable_reason", lambda device, dtype, head_dim: None)
    return fake


# ---------------------------------------------------------------------------------------------
# the logic, on CPU against the fakes


def _assert_same_selection(got: AnchorSelection, ref: AnchorSelection, layout: KeyLayout) -> None:
    torch.testing.assert_close(got.mass, ref.mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.head_mass_tau, ref.head_mass_tau, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.signal, ref.signal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.kept.count, ref.kept.count)
    assert got.kept.block == 1 and _kept_sets(got.kept, layout) == _kept_sets(ref.kept, layout)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("score", SCORES)
def test_anchor_select_matches_the_reference(fake_fmha, shape, rule, score):
    q, k, _, layout, scale = _inputs(shape)
    got = xf.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    _assert_same_selection(got, reference.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score), layout)
    assert got.scores.dtype == got.mass.dtype == got.signal.dtype == got.head_mass_tau.dtype == torch.float32
    # one partial attention per non-empty segment and sequence, twice when the rule's τ is not 1
    segments = sum(len(xf._nonvisual(b)) + 1 for b in xf._host_bounds(layout, k.shape[2]))
    assert len(fake_fmha.calls) == segments * (1 if RULES[rule].tau == 1.0 else 2)


def _kept_variants(q, k, layout, scale) -> dict[str, KeptSet | None]:
    """No pruning, the paper rule's selection, 3-token blocks, and a random selection in which
    sequence 0 keeps no visual token at all."""
    selection = reference.anchor_select(q, k, layout, RULES["paper-0.4-ceil"], scale=scale)
    valid = layout.visual_index()[1]
    keep = (torch.rand(valid.shape, generator=torch.Generator().manual_seed(1)) < 0.4) & valid
    keep[0] = False
    return {
        "all": None,
        "rule": selection.kept,
        "blocks": reference.block_cover(selection.kept, layout.visual_len, 3),
        "random-one-empty": reference.kept_from_mask(keep),
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kept", ["all", "rule", "blocks", "random-one-empty"])
def test_sparse_decode_matches_the_reference(fake_fmha, shape, kept):
    q, k, v, layout, scale = _inputs(shape)
    selection = _kept_variants(q, k, layout, scale)[kept]
    out, lse = xf.sparse_decode(q, k, v, layout, selection, scale=scale, return_lse=True)
    ref_out, ref_lse = reference.sparse_decode(q, k, v, layout, selection, scale=scale, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    plain = xf.sparse_decode(q, k, v, layout, selection, scale=scale)
    torch.testing.assert_close(plain, out, atol=0, rtol=0)


def test_sparse_decode_gathers_exactly_the_kept_keys(fake_fmha):
    """The keys handed to xformers are the attended slots of each sequence, each once."""
    q, k, v, layout, scale = _inputs("ragged-gqa4")
    kept = reference.block_cover(_kept_variants(q, k, layout, scale)["random-one-empty"], layout.visual_len, 3)
    xf.sparse_decode(q, k, v, layout, kept, scale=scale)
    seen = [_slots_of(key[0, :, :, 0], k) for _, key, _ in fake_fmha.calls]
    assert sum(len(s) for s in seen) == len(set().union(*seen))
    attended = reference.attended_slots(layout, kept, k.shape[2])
    assert set().union(*seen) == {(b, t) for b, t in attended.nonzero().tolist()}


def _slots_of(keys: torch.Tensor, cache: torch.Tensor) -> set[tuple[int, int]]:
    """The (sequence, slot) pairs of the cache [B, H_kv, T, D] whose keys a segment [L, H_kv, D] holds."""
    match = (keys.transpose(0, 1)[None, :, :, None, :] == cache[:, :, None, :, :]).all(-1).all(1)  # [B, L, T]
    assert bool((match.sum(dim=(0, 2)) == 1).all()), "every key is one cache slot's"
    return {(b, t) for b, _, t in match.nonzero().tolist()}


def test_segments_are_strided_views_of_the_cache(fake_fmha):
    """Without a selection, every key and value segment is a view of the cache (nothing copied),
    each group's KV head repeated with stride 0, and the query is one BMGHK row per sequence."""
    q, k, v, layout, scale = _inputs("ragged-gqa4")
    xf.sparse_decode(q, k, v, layout, None, scale=scale)
    xf.anchor_select(q, k, layout, RULES["paper-0.1"], scale=scale)
    assert fake_fmha.calls
    for query, key, value in fake_fmha.calls:
        assert query.shape[:4] == (1, 1, 2, 4)
        assert key.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert value.untyped_storage().data_ptr() in (k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr())
        assert key.stride(3) == 0 and value.stride(3) == 0


def test_a_sequence_with_no_key_left_is_an_error(fake_fmha):
    q, k, v, _, scale = _inputs("mha-no-suffix")
    layout = KeyLayout.build([4, 3], [14, 40], [4, 3], [10, 25])  # sequence 0: only visual keys
    nothing = reference.kept_from_mask(torch.zeros(2, 25, dtype=torch.bool))
    with pytest.raises(LayoutError, match="sequence 0 attends to no key"):
        xf.sparse_decode(q, k, v, layout, nothing, scale=scale)


def test_bad_inputs_are_one_line_layout_errors(fake_fmha):
    q, k, v, layout, scale = _inputs("mha-no-suffix")
    with pytest.raises(LayoutError, match="score must be one of"):
        xf.anchor_select(q, k, layout, RULES["paper-0.1"], scale=scale, score="attention")
    with pytest.raises(LayoutError, match="differs from the query's"):
        xf.sparse_decode(q, k, v.double(), layout, None, scale=scale)
    with pytest.raises(LayoutError, match="end <= cache slots"):
        xf.sparse_decode(q, k[:, :, :30], v[:, :, :30], layout, None, scale=scale)


# ---------------------------------------------------------------------------------------------
# availability


def test_unavailable_reason_names_device_dtype_and_head_dim():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert xf.unavailable_reason(cpu, torch.bfloat16, 64) == "xformers backend needs a CUDA device (got cpu)"
    assert xf.unavailable_reason(cuda, torch.float32, 64) == (
        "xformers backend needs float16 or bfloat16 (got torch.float32)"
    )
    for head_dim in (20, 264):
        reason = xf.unavailable_reason(cuda, torch.bfloat16, head_dim)
        assert reason.startswith(f"xformers backend: head dim {head_dim} is not supported by the partial-attention ops")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_the_backend_refuses_the_cpu_in_one_line():
    q, k, v, layout, scale = _inputs("ragged-gqa4", dtype=torch.bfloat16)
    expected = xf.unavailable_reason(q.device, q.dtype, q.shape[-1])
    assert expected and "\n" not in expected
    with pytest.raises(BackendUnavailable) as raised:
        xf.sparse_decode(q, k, v, layout, None, scale=scale)
    assert str(raised.value) == expected
    with pytest.raises(BackendUnavailable) as raised:
        xf.anchor_select(q, k, layout, RULES["paper-0.1"], scale=scale)
    assert str(raised.value) == expected


_CONTRACT = """
import inspect, json, sys
import torch
import vpstudy.backends.xformers as xf
facts = {"lazy": "xformers" not in sys.modules}
try:
    from xformers.ops import fmha
except Exception as e:
    print(json.dumps(facts | {"import_error": str(e)}))
    raise SystemExit
x = torch.empty(1, 1, 1, 1, 20, dtype=torch.bfloat16)
ops = {"fa2F": fmha.flash.FwOp, "fa3F": fmha.flash3.FwOp}
facts |= {
    "partial": inspect.signature(fmha.memory_efficient_attention_partial).parameters.keys() >= {"scale"},
    "merge": list(inspect.signature(fmha.merge_attentions).parameters)[:3] == ["attn_split", "lse_split", "write_lse"],
    "partial_out_dtype": str(fmha.Inputs(x, x, x, is_partial=True).get_output_dtype()),
    "priority": hasattr(fmha.dispatch, "_dispatch_fw_priority_list"),
    "ops": {name: {"partial": op.SUPPORTS_PARTIAL, "bmghk": op.SUPPORTS_BMGHK, "scale": op.SUPPORTS_CUSTOM_SCALE,
                   "max_k": op.SUPPORTED_MAX_K, "dtypes": sorted(map(str, op.SUPPORTED_DTYPES)),
                   "align": any("% 8 != 0" in r for r in op.not_supported_reasons(fmha.Inputs(x, x, x)))}
            for name, op in ops.items()},
    "max_k": xf.MAX_HEAD_DIM, "multiple": xf.HEAD_DIM_MULTIPLE,
}
print(json.dumps(facts))
"""


def test_import_is_lazy_and_the_xformers_contract_holds():
    """Importing the backend imports no xformers; the installed xformers has the API and the op
    limits the backend and its fakes assume (skipped where xformers cannot be imported)."""
    run = subprocess.run([sys.executable, "-c", _CONTRACT], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert facts["lazy"]
    if "import_error" in facts:
        pytest.skip(f"xformers cannot be imported: {facts['import_error']}")
    assert facts["partial"] and facts["merge"] and facts["priority"]
    assert facts["partial_out_dtype"] == "torch.float32"
    for name, op in facts["ops"].items():
        assert op["partial"] and op["bmghk"] and op["scale"] and op["align"], name
        assert op["max_k"] == facts["max_k"] == 256 and facts["multiple"] == 8, name
        assert {"torch.bfloat16", "torch.float16"} <= set(op["dtypes"]), name


# ---------------------------------------------------------------------------------------------
# the real xformers (CUDA only)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def _require_real(head_dim: int) -> None:
    reason = xf.unavailable_reason(CUDA, torch.bfloat16, head_dim)
    if reason is not None:
        pytest.skip(reason)


@needs_cuda
def test_the_fakes_follow_the_real_xformers():
    from xformers.ops import fmha

    _require_real(64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 4, 64, generator=g).to(CUDA, torch.bfloat16)
    cache = torch.randn(2, 50, 64, generator=g).to(CUDA, torch.bfloat16)  # [H_kv, T, D]
    fake, parts = FakeFmha(), []
    for s, e in ((0, 17), (17, 50)):
        k5 = xf._keys5(cache[:, s:e], 4)
        real = fmha.memory_efficient_attention_partial(q, k5, k5, scale=0.3)
        mine = fake.memory_efficient_attention_partial(q, k5, k5, scale=0.3)
        assert real[1].shape == mine[1].shape == (1, 2, 4, 1)
        torch.testing.assert_close(real[0].float(), mine[0], atol=2e-2, rtol=0)
        torch.testing.assert_close(real[1].float(), mine[1], atol=1e-2, rtol=0)
        parts.append(mine)
    real = fmha.merge_attentions([o for o, _ in parts], [s for _, s in parts], write_lse=True)
    mine = fake.merge_attentions([o for o, _ in parts], [s for _, s in parts], write_lse=True)
    assert real[0].shape == mine[0].shape and real[1].shape == mine[1].shape
    torch.testing.assert_close(real[0].float(), mine[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(real[1].float(), mine[1], atol=1e-3, rtol=0)


@needs_cuda
def test_unavailable_reason_on_cuda():
    _require_real(128)
    assert xf.unavailable_reason(CUDA, torch.float16, 64) is None
    assert "head dim 264" in xf.unavailable_reason(CUDA, torch.bfloat16, 264)


def _stable_rows(ref: AnchorSelection, layout: KeyLayout, score: str) -> list[int]:
    """Sequences whose reference scores at the K-th boundary are more than 1e-2 apart (for
    probabilities, 1e-2 of the K-th score): there bf16 cannot reorder the kept set."""
    rows = []
    for b in range(layout.batch):
        ranked = ref.scores[b, : int(layout.visual_len[b])].sort(descending=True).values
        n = int(ref.kept.count[b])
        tol = 1e-2 if score == "logits" else 1e-2 * float(ranked[n - 1])
        if n == ranked.numel() or float(ranked[n - 1] - ranked[n]) > tol:
            rows.append(b)
    return rows


@needs_cuda
@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("rule", ["paper-0.1", "fitted-mass"])
@pytest.mark.parametrize("score", SCORES)
def test_real_xformers_matches_the_reference_in_bf16(shape, rule, score):
    q, k, v, layout, scale = _inputs(shape, CUDA, torch.bfloat16)
    _require_real(q.shape[-1])
    got = xf.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    ref = reference.anchor_select(q, k, layout, RULES[rule], scale=scale, score=score)
    for field in ("mass", "head_mass_tau", "signal"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), atol=1e-2, rtol=0)
    assert int((got.kept.count - ref.kept.count).abs().max()) <= 1
    stable = [b for b in _stable_rows(ref, layout, score) if int(got.kept.count[b]) == int(ref.kept.count[b])]
    mine, theirs = _kept_sets(got.kept, layout), _kept_sets(ref.kept, layout)
    assert [mine[b] for b in stable] == [theirs[b] for b in stable]
    for kept in (None, ref.kept, reference.block_cover(ref.kept, layout.visual_len, 4)):
        out, lse = xf.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True)
        ref_out, ref_lse = reference.sparse_decode(q, k, v, layout, kept, scale=scale, return_lse=True)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
