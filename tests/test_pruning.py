"""Pruning methods on tiny random models of every family: mask ≡ physical, keep-everything ≡ plain
generate, hidden keys get exactly zero attention in transformers' eager weights (the oracle),
counts follow the rule on hand-built attention, a batch equals its rows one by one, bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import vpstudy
from vpstudy.rules import BudgetRule
from vpstudy.families import FAMILIES
from vpstudy.loading import config_hash
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.pruning import (
    FastV,
    Pruner,
    PruningError,
    PyramidDrop,
    RandomBudget,
    StaticTopK,
    TopK,
    TopP,
    VisionPulse,
    make_method,
)
from vpstudy.pruning.methods import Decision

ALL_FAMILIES = sorted(FAMILIES)
QUESTIONS = ["what colour is the square", "count the red objects", "is there a circle left of the blue square"]
NEW_TOKENS = 6


def _inputs(model, processor, indices=(0, 1, 2)):
    rng = np.random.default_rng(0)
    sizes = [(84, 84), (84, 112), (60, 100)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    spec = model.vpstudy_family
    prompts = [format_prompt(processor, spec, QUESTIONS[i]) for i in indices]
    return prepare_batch(processor, spec, model.config, prompts, [images[i] for i in indices])


def _generate(model, inputs, methods=None, mode="mask", **kwargs):
    """(generate output with scores, kept traces or None)."""
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True) | kwargs
    with torch.inference_mode():
        if methods is None:
            return model.generate(**inputs, **kwargs), None
        with Pruner(model, methods, mode=mode) as pruner:
            out = model.generate(**inputs, **kwargs)
        return out, pruner.kept()


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request, tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs[request.param])
    return dict(name=request.param, path=tiny_dirs[request.param], model=model, processor=processor,
                inputs=_inputs(model, processor))  # fmt: skip


def _step_wise(n_layers):
    anchor = n_layers // 2
    return [VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=anchor), TopK(0.25, anchor=anchor),
            TopP(0.5, anchor=anchor), RandomBudget(0.25, anchor=anchor, seed=3)]  # fmt: skip


def test_mask_and_physical_modes_give_the_same_tokens_and_logits(family):
    n_layers = family["model"].config.get_text_config().num_hidden_layers
    for method in _step_wise(n_layers):
        masked, kept_mask = _generate(family["model"], family["inputs"], [method], "mask")
        physical, kept_physical = _generate(family["model"], family["inputs"], [method], "physical")
        assert torch.equal(masked.sequences, physical.sequences), method
        for a, b in zip(masked.scores, physical.scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        for a, b in zip(kept_mask, kept_physical, strict=True):
            np.testing.assert_array_equal(a.counts, b.counts)
            np.testing.assert_array_equal(a.masks, b.masks)
        # something was actually hidden at decode steps, and only at layers >= the anchor
        counts = kept_mask[0].counts
        n_visual = kept_mask[0].masks.shape[-1]
        assert (counts[1:, method.anchor:] < n_visual).any() and (counts[:, : method.anchor] == n_visual).all()
        assert (counts[0] == n_visual).all()  # the prefill stays dense


def test_keep_everything_settings_generate_exactly_what_the_model_does(family):
    plain, _ = _generate(family["model"], family["inputs"])
    n_layers = family["model"].config.get_text_config().num_hidden_layers
    keep_all = [VisionPulse(b_min=1.0, b_max=1.0), TopK(1.0), TopP(1.0), FastV(layer=1, ratio=0.0),
                PyramidDrop(keep_ratio=1.0), StaticTopK(1.0), RandomBudget(1.0)]  # fmt: skip
    for method in keep_all:
        out, kept = _generate(family["model"], family["inputs"], [method])
        assert torch.equal(out.sequences, plain.sequences), method
        for a, b in zip(out.scores, plain.scores, strict=True):
            assert torch.equal(a, b), method
        assert all((k.counts == k.masks.shape[-1]).all() for k in kept)
    assert n_layers >= 2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hidden_keys_get_zero_weight_in_transformers_eager_attention(family, cache):
    """The oracle is transformers' own eager attention weights (output_attentions) of the pruned
    model: at layers >= the anchor every hidden visual key has weight exactly 0, every kept one
    a positive weight, and below the anchor nothing is hidden; on a static cache the unwritten
    slots get weight 0 too."""
    eager = AutoModelForImageTextToText.from_pretrained(family["path"], attn_implementation="eager").eval()
    eager.vpstudy_family = family["model"].vpstudy_family
    n_layers = eager.config.get_text_config().num_hidden_layers
    anchor = n_layers // 2
    out, kept = _generate(eager, family["inputs"], [TopK(0.25, anchor=anchor)], output_attentions=True,
                          cache_implementation=cache)  # fmt: skip
    spec = family["model"].vpstudy_family
    visual = spec.visual_mask(family["inputs"]["input_ids"], eager.config)
    prompt = family["inputs"]["input_ids"].shape[1]
    for b, trace in enumerate(kept):
        positions = visual[b].nonzero().flatten()
        for t in range(1, len(out.attentions)):
            for layer in range(n_layers):
                assert (out.attentions[t][layer][b, :, -1, prompt + t :] == 0).all()  # static: the unwritten tail
                weights = out.attentions[t][layer][b, :, -1, positions]  # [H, N_v]
                keep = torch.as_tensor(trace.masks[t, 0]) if layer >= anchor else torch.ones(len(positions), dtype=torch.bool)
                assert (weights[:, ~keep] == 0).all() and (weights[:, keep] > 0).all()
                assert int(keep.sum()) == trace.counts[t, layer] == (
                    max(1, math.floor(0.25 * len(positions) + 1e-9)) if layer >= anchor else len(positions))


def test_a_batch_with_different_budgets_equals_its_rows_one_by_one(family):
    # a hand-set rule stretching the range of the rows' max-head visual shares M (τ = 1, at the
    # anchor, measured densely) over the whole ratio range, so the rows get different budgets
    # even on the tiniest models (InternVL: N_v = 4). In float64, so that padding's ~1e-7 float32
    # differences cannot move floor(ratio · N_v) across an integer.
    model, _ = vpstudy.load(family["path"], dtype=torch.float64)
    family = family | {"model": model, "inputs": _inputs(model, family["processor"])}
    anchor = model.config.get_text_config().num_hidden_layers // 2
    with vpstudy.record(model, layers=[anchor], temperatures=()) as recorder, torch.inference_mode():
        model.generate(**family["inputs"], max_new_tokens=NEW_TOKENS, do_sample=False)
    signals = np.concatenate([t.max_head_mass[1:, 0] for t in recorder.traces()])
    slope = 1.0 / (signals.max() - signals.min())
    rule = BudgetRule(signal="max_head_mass", b_min=0.01, b_max=1.0, slope=slope, intercept=-signals.min() * slope)
    method = VisionPulse(rule=rule, anchor=anchor)
    batch, kept = _generate(family["model"], family["inputs"], [method])
    prompt = family["inputs"]["input_ids"].shape[1]
    for b in range(3):
        inputs = _inputs(family["model"], family["processor"], (b,))
        alone, kept_alone = _generate(family["model"], inputs, [method])
        generated = alone.sequences[0, inputs["input_ids"].shape[1] :]
        assert torch.equal(batch.sequences[b, prompt : prompt + len(generated)], generated)
        steps = len(kept_alone[0].counts)  # the batch goes on for rows that have not ended
        np.testing.assert_array_equal(kept[b].counts[:steps], kept_alone[0].counts)
        np.testing.assert_array_equal(kept[b].masks[:steps], kept_alone[0].masks)
    # the rows did get different budgets at some step
    assert len({tuple(k.counts[1:, -1]) for k in kept}) > 1


def test_prefill_and_step_wise_methods_compose(family):
    n_layers = family["model"].config.get_text_config().num_hidden_layers
    fastv, pulse = FastV(layer=1, ratio=0.5), VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=n_layers - 1)
    _, kept_fastv = _generate(family["model"], family["inputs"], [fastv])
    _, kept_both = _generate(family["model"], family["inputs"], [pulse, fastv])  # order does not matter
    for alone, both in zip(kept_fastv, kept_both, strict=True):
        n = alone.masks.shape[-1]
        assert (alone.counts[:, 1:] == math.ceil(0.5 * n)).all() and (alone.counts[:, 0] == n).all()
        # the prefill and layers below the VisionPulse anchor are FastV's alone
        np.testing.assert_array_equal(both.counts[0], alone.counts[0])
        assert (both.counts[1:, -1] <= alone.counts[1:, -1]).all() and (both.masks[:, -1] <= both.masks[:, 0]).all()


def _decision(shares, n_visual, n_text, tau):
    """A Decision whose head h puts visual share ``shares[h]`` on the visual keys at temperature τ
    (equal logits inside each group), with visual logits also ranking the tokens 0 > 1 > 2 ..."""
    heads = len(shares)
    logits = torch.zeros(1, heads, n_text + n_visual, dtype=torch.float64)
    for h, share in enumerate(shares):
        # n_v e^(c/τ) / (n_v e^(c/τ) + n_t) = share  ->  c = τ log(share n_t / ((1 - share) n_v))
        logits[0, h, n_text:] = tau * math.log(share * n_text / ((1 - share) * n_visual))
    logits[0, :, n_text:] += torch.linspace(1e-7, 0, n_visual, dtype=torch.float64)  # a tiny ranking, no mass change
    index = torch.arange(n_text, n_text + n_visual).unsqueeze(0)
    valid = torch.ones(1, n_visual, dtype=torch.bool)
    return Decision(logits, index, valid, valid.clone(), torch.tensor([n_visual]), 1, torch.Generator())  # float64: exact plant


@pytest.mark.parametrize("n_visual", [64, 100, 576, 1000])
def test_counts_follow_the_rule_on_hand_built_attention(n_visual):
    method = VisionPulse(tau=0.1, b_min=0.01, b_max=0.05)
    # a planted max-head mass of 0.03 inside [0.01, 0.05] keeps floor(0.03 · N_v)
    keep = method.keep(0, _decision([0.01, 0.03, 0.02], n_visual, 50, 0.1))
    assert int(keep.sum()) == max(1, math.floor(0.03 * n_visual))
    assert keep[0, : int(keep.sum())].all()  # the top of the ranking
    assert int(method.keep(0, _decision([0.2, 0.3], n_visual, 50, 0.1)).sum()) == max(1, math.floor(0.05 * n_visual))
    assert int(method.keep(0, _decision([0.001], n_visual, 50, 0.1)).sum()) == max(1, math.floor(0.01 * n_visual))
    fitted = VisionPulse(rule=BudgetRule(signal="max_head_mass@tau=0.1", b_min=0.01, b_max=0.5, slope=2.0, intercept=0.01))
    assert int(fitted.keep(0, _decision([0.1], n_visual, 50, 0.1)).sum()) == math.floor(0.21 * n_visual + 1e-9)


def test_top_counts_keeps_what_a_stable_sort_keeps():
    """The top-K without a sort equals the rank mask of a stable descending sort (the official
    code's), on scores full of exact ties, with tokens not allowed, K = 0 and K above the allowed."""
    from vpstudy.selection import top_counts_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 40), generator=g).double()
    allowed = torch.rand(6, 40, generator=g) < 0.7
    counts = torch.tensor([0, 1, 7, 13, 28, 40])
    order = torch.sort(scores.masked_fill(~allowed, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(40).expand_as(order))
    assert torch.equal(top_counts_mask(scores, counts, allowed), (rank < counts[:, None]) & allowed)
    assert not top_counts_mask(scores, torch.zeros(6, dtype=torch.long), allowed).any()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    from vpstudy.selection import top_p_mask

    assert top_p_mask(probs, 0.5, valid).tolist() == [[False, True, False, True, False]]  # 0.7 >= 0.5
    assert top_p_mask(probs, 0.7, valid).tolist() == [[False, True, False, True, False]]  # exactly reached
    assert top_p_mask(probs, 0.71, valid).tolist() == [[False, True, False, True, True]]
    assert top_p_mask(probs, 0.01, valid).sum() == 1


def test_the_model_is_restored_exactly_on_exit(family):
    model = family["model"]
    before = [(c, c._attn_implementation) for c in [model.config, *[getattr(model.config, k) for k in model.config.sub_configs]]]
    plain, _ = _generate(model, family["inputs"])
    _generate(model, family["inputs"], [TopK(0.25)])
    assert [(c, c._attn_implementation) for c, _ in before] == before
    again, _ = _generate(model, family["inputs"])
    assert torch.equal(plain.sequences, again.sequences)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_method("fastv2"), "unknown pruning method 'fastv2' (known: visionpulse, topk"),
        (lambda: make_method("topk", ratio=0.1, k=3), "topk: unknown setting(s) k (known: anchor, ratio)"),
        (lambda: TopK(ratio=0.0), "topk: ratio must be in (0, 1], got 0.0"),
        (lambda: VisionPulse(b_min=0.05, b_max=1.5), "visionpulse: b_max must be in (0, 1], got 1.5"),
        (lambda: TopP(p=2), "topp: p must be in (0, 1], got 2"),
    ],
)
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(PruningError, match=re.escape(message)):
        make()


def test_an_anchor_out_of_range_or_a_foreign_rule_is_refused(family):
    model = family["model"]
    n_layers = model.config.get_text_config().num_hidden_layers
    with pytest.raises(PruningError, match=rf"topk: anchor layer 9 out of range: the text model has {n_layers} layers"):
        Pruner(model, [TopK(0.1, anchor=9)])
    foreign = BudgetRule(signal="mass", b_min=0.01, b_max=0.1, layer=0, model={"config_hash": "other", "path": "/x"})
    with pytest.raises(ValueError, match=r"fitted on model /x \(config other\), not this one"):
        Pruner(model, [VisionPulse(rule=foreign)])
    own = BudgetRule(signal="mass", b_min=0.01, b_max=0.1, layer=0, model={"config_hash": config_hash(model.config)})
    with pytest.raises(ValueError, match="fitted at layer 0, not layer 1"):
        Pruner(model, [VisionPulse(rule=own, anchor=1)])
    Pruner(model, [VisionPulse(rule=own)])  # at its own layer it applies
    Pruner(model, [VisionPulse(rule=foreign, allow_rule_mismatch=True)])


def test_the_config_hash_does_not_depend_on_how_the_path_was_spelled(tiny_dirs, monkeypatch):
    """A rule fitted from a run of ``data/x`` must apply to the model loaded as ``/abs/data/x``."""
    path = tiny_dirs["llava"]
    monkeypatch.chdir(path.parent)
    relative, _ = vpstudy.load(path.name)
    absolute, _ = vpstudy.load(path.resolve())
    assert config_hash(relative.config) == config_hash(absolute.config)


def test_a_static_cache_prunes_exactly_as_a_dynamic_one(family):
    """Every step-wise method and a prefill method (FastV decides on the prefill's last row, where
    transformers passes no mask over a static cache's unwritten tail), in mask mode and in physical
    mode (VisionPulse on the fast path), on a static cache: the tokens, logits (<=1e-5) and kept
    sets of mask mode on the default dynamic cache, on a left-padded batch of 3 and on one row
    alone (no padding: the prefill then gets no mask at all)."""
    n_layers = family["model"].config.get_text_config().num_hidden_layers
    alone = _inputs(family["model"], family["processor"], (0,))
    methods = [*_step_wise(n_layers), FastV(layer=1, ratio=0.5)]
    for inputs, method in [(x, m) for x in (family["inputs"], alone) for m in methods]:
        dynamic, kept_dynamic = _generate(family["model"], inputs, [method], "mask")
        for mode in ("mask", "physical"):
            static, kept_static = _generate(family["model"], inputs, [method], mode, cache_implementation="static")
            assert torch.equal(static.sequences, dynamic.sequences), (method, mode)
            for a, b in zip(static.scores, dynamic.scores, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            for a, b in zip(kept_static, kept_dynamic, strict=True):
                np.testing.assert_array_equal(a.counts, b.counts)
                np.testing.assert_array_equal(a.masks, b.masks)
