"""The pruner's decode fast path (physical mode through a decode backend) on tiny random models:
it generates what mask mode generates (tokens, logits, kept sets), with the Triton kernels (in
Triton's interpreter without CUDA) and with their pure-torch reference; chunked prefill; and
the fallbacks, each with a message saying why."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import vpstudy
from vpstudy.backends.dense import DenseDecode
from vpstudy.families import FAMILIES
from vpstudy.kernels import triton_unavailable_reason
from vpstudy.pruning import FastV, Pruner, PruningError, VisionPulse

from test_pruning import _inputs

NEW_TOKENS = 5
TRITON = triton_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 16)


def _run(model, inputs, method, mode, backend="auto", **kwargs):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True) | kwargs
    with torch.inference_mode(), Pruner(model, [method], mode=mode, backend=backend) as pruner:
        out = model.generate(**inputs, **kwargs)
    return out, pruner


def _assert_same(a, b):
    (out_a, pruner_a), (out_b, pruner_b) = a, b
    assert torch.equal(out_a.sequences, out_b.sequences)
    for x, y in zip(out_a.scores, out_b.scores, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for x, y in zip(pruner_a.kept(), pruner_b.kept(), strict=True):
        np.testing.assert_array_equal(x.counts, y.counts)
        np.testing.assert_array_equal(x.masks, y.masks)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs[request.param])
    return dict(name=request.param, model=model, inputs=_inputs(model, processor))


def _method(model):
    n_layers = model.config.get_text_config().num_hidden_layers
    return VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=n_layers // 2)


def test_reference_backend_fast_path_generates_what_mask_mode_does(family):
    model, inputs = family["model"], family["inputs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path really runs: no fallback message
        fast = _run(model, inputs, _method(model), "physical", backend="reference")
    assert fast[1].backend is not None and fast[1].backend.name == "reference"
    _assert_same(fast, _run(model, inputs, _method(model), "mask"))
    kept = fast[1].kept()[0]
    assert (kept.counts[1:, _method(model).anchor :] < kept.masks.shape[-1]).any()  # something was pruned


@pytest.mark.skipif(TRITON is not None, reason=str(TRITON))
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_triton_backend_fast_path_generates_what_mask_mode_does(name, tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs[name])
    inputs = _inputs(model, processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = _run(model, inputs, _method(model), "physical", backend="triton")
    assert fast[1].backend.name == "triton"
    _assert_same(fast, _run(model, inputs, _method(model), "mask"))


def test_a_chunked_prefill_prunes_like_a_whole_one(tiny_dirs):
    """Visual positions are collected across prefill chunks (placeholders embedded as text: chunked
    prefill cannot split raw pixels)."""
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = {k: v for k, v in _inputs(model, processor).items() if k in ("input_ids", "attention_mask")}
    whole = _run(model, inputs, _method(model), "physical", backend="reference")
    chunked = _run(model, inputs, _method(model), "physical", backend="reference", prefill_chunk_size=7)
    _assert_same(whole, chunked)
    with pytest.raises(PruningError, match="prefill methods need the whole prompt in one forward"):
        with torch.inference_mode(), Pruner(model, [FastV(layer=1, ratio=0.5)], mode="mask"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=7)


def test_method_sets_the_fast_path_does_not_serve_fall_back_with_a_message(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _inputs(model, processor)
    methods = [FastV(layer=1, ratio=0.5), _method(model)]
    with pytest.warns(UserWarning, match="serves VisionPulse alone; fastv, visionpulse run on the gathered reference path"):
        with torch.inference_mode(), Pruner(model, methods, mode="physical", backend="reference") as pruner:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.backend is None
    with pytest.raises(PruningError, match="backend must be one of auto, reference, cpu, triton, xformers, gather, "
                                           "got 'cuda'"):
        Pruner(model, [_method(model)], mode="physical", backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_decode_through_a_backend_generates_what_the_model_does(backend, tiny_dirs):
    if backend == "triton" and TRITON is not None:
        pytest.skip(TRITON)
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    inputs = _inputs(model, processor)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode():
        plain = model.generate(**inputs, **kwargs)
        with DenseDecode(model, backend=backend) as dense:
            routed = model.generate(**inputs, **kwargs)
    assert dense.backend.name == backend and dense.calls == NEW_TOKENS - 1  # every decode step went through it
    assert torch.equal(plain.sequences, routed.sequences)
    for x, y in zip(plain.scores, routed.scores, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_a_backend_that_cannot_run_here_falls_back_to_the_reference_with_its_reason(tiny_dirs):
    if torch.cuda.is_available():
        pytest.skip("xformers can run on this machine")
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _inputs(model, processor)
    with pytest.warns(UserWarning, match=r"xformers backend needs a CUDA device \(got cpu\); using the reference backend"):
        fast = _run(model, inputs, _method(model), "physical", backend="xformers")
    assert fast[1].backend.name == "reference"
    _assert_same(fast, _run(model, inputs, _method(model), "mask"))


def test_the_block_sparse_variant_keeps_the_blocks_of_the_rules_tokens(tiny_dirs):
    """At the first decode step (the same prefix in both runs) the block variant keeps exactly the
    4-token blocks that hold a token the token-exact rule keeps, and reports them as kept."""
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    inputs = _inputs(model, processor)
    method = _method(model)
    exact = _run(model, inputs, method, "physical", backend="reference")[1].kept()
    with torch.inference_mode(), Pruner(model, [method], mode="physical", backend="reference", kept_block=4) as pruner:
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    blocks = pruner.kept()
    for token_trace, block_trace in zip(exact, blocks, strict=True):
        tokens, covered = token_trace.masks[1, 0], block_trace.masks[1, 0]
        n = len(tokens)
        expected = np.repeat(np.pad(tokens, (0, -n % 4)).reshape(-1, 4).any(-1), 4)[:n]
        np.testing.assert_array_equal(covered, expected)
        assert block_trace.counts[1, method.anchor] == covered.sum() > token_trace.counts[1, method.anchor]
    with pytest.raises(PruningError, match="kept_block is an option of physical mode"):
        Pruner(model, [method], mode="mask", kept_block=4)
