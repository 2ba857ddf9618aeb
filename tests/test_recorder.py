"""The recorder against transformers' own eager attention weights (the oracle), on every family,
decoding on a dynamic and on a static (preallocated) KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import vpstudy
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.hooks import HookContext
from vpstudy.recorder import RecorderError
from vpstudy.rules import Threshold, ThresholdError

from vpstudy.families import FAMILIES

ALL_FAMILIES = sorted(FAMILIES)
CACHES = ("dynamic", "static")  # generate(cache_implementation=...): the recorder must read both exactly

QUESTIONS = ["what colour is the square", "count the red objects", "is there a circle left of the blue square"]
NEW_TOKENS = 8
THRESHOLDS = ["0.0005", "0.002", "0.05", "1/Nv"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(84, 84), (84, 112), (60, 100)]  # different sizes: ragged N_v for dynamic-resolution families
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _inputs(model, processor, indices=(0, 1, 2)):
    spec = model.vpstudy_family
    images = _images()
    prompts = [format_prompt(processor, spec, QUESTIONS[i]) for i in indices]
    return prepare_batch(processor, spec, model.config, prompts, [images[i] for i in indices])


def _generate(model, inputs, cache=None, **kwargs):
    if cache is not None:
        kwargs["cache_implementation"] = cache
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="module", params=[(f, c) for f in ALL_FAMILIES for c in CACHES], ids="-".join)
def family_run(request, tiny_dirs):
    """Per family and cache: a padded batch of 3 recorded with all layers, plus the oracle (eager
    attention weights of transformers' default generation, which owes nothing to the recorder)."""
    family, cache = request.param
    path = tiny_dirs[family]
    model, processor = vpstudy.load(path)
    inputs = _inputs(model, processor)
    plain = _generate(model, inputs, cache)
    with vpstudy.record(model, thresholds=THRESHOLDS) as rec:
        recorded = _generate(model, inputs, cache)
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    oracle = _generate(eager, inputs, output_attentions=True, return_dict_in_generate=True)
    return dict(model=model, processor=processor, inputs=inputs, plain=plain, recorded=recorded,
                traces=rec.traces(), oracle=oracle, family=family, cache=cache)  # fmt: skip


def _oracle_rows(run, b: int) -> np.ndarray:
    """Head-mean eager probabilities at sample b's visual keys: [steps, layers, N_v]."""
    spec, model = run["model"].vpstudy_family, run["model"]
    positions = spec.visual_mask(run["inputs"]["input_ids"], model.config)[b].nonzero().flatten()
    steps = run["traces"][b].n_steps
    return np.stack([
        np.stack([layer[b, :, -1, :].float().mean(0)[positions].numpy() for layer in run["oracle"].attentions[t]])
        for t in range(steps)
    ])  # fmt: skip


def test_scores_equal_eager_attention_weights(family_run):
    for b, trace in enumerate(family_run["traces"]):
        expected = _oracle_rows(family_run, b)
        assert trace.scores.shape == expected.shape
        np.testing.assert_allclose(trace.scores, expected, atol=1e-5, rtol=0)


def test_mass_max_head_mass_counts_and_running_max_follow_eager(family_run):
    for b, trace in enumerate(family_run["traces"]):
        expected = _oracle_rows(family_run, b)
        np.testing.assert_allclose(trace.mass, expected.sum(-1), atol=1e-5, rtol=0)
        np.testing.assert_allclose(trace.max_scores, expected.max(axis=0), atol=1e-5, rtol=0)
        positions = trace.visual_positions
        per_head = np.stack([
            np.stack([layer[b, :, -1, positions].float().sum(-1).numpy() for layer in family_run["oracle"].attentions[t]])
            for t in range(trace.n_steps)
        ])  # fmt: skip  [steps, layers, heads]
        np.testing.assert_allclose(trace.max_head_mass, per_head.max(-1), atol=1e-5, rtol=0)
        for k, threshold in enumerate(trace.thresholds):
            delta = threshold.resolve(trace.n_visual)
            counts = (trace.scores > delta).sum(-1)  # away from the boundary these equal the oracle's
            near = np.abs(expected - delta).min(-1) < 1e-5
            np.testing.assert_array_equal(counts[~near], (expected > delta).sum(-1)[~near])
            np.testing.assert_array_equal(trace.active[:, :, k], counts)


def test_budget_signal_follows_eager_at_each_temperature(family_run):
    """softmax(log p / τ) = softmax(logits / τ), so the eager probabilities give the oracle."""
    for b, trace in enumerate(family_run["traces"]):
        assert trace.temperatures == [0.1, 0.4]
        positions = trace.visual_positions
        for k, tau in enumerate(trace.temperatures):
            expected = np.stack([
                np.stack([
                    torch.softmax(layer[b, :, -1, :].double().log() / tau, dim=-1)[:, positions].sum(-1).max().item()
                    for layer in family_run["oracle"].attentions[t]
                ])
                for t in range(trace.n_steps)
            ])  # fmt: skip  [steps, layers]
            np.testing.assert_allclose(trace.tau_max_head_mass[:, :, k], expected, atol=1e-4, rtol=0)


def test_generation_is_unchanged_by_recording(family_run):
    assert torch.equal(family_run["recorded"], family_run["plain"])
    assert torch.equal(family_run["recorded"], family_run["oracle"].sequences)


def test_steps_stop_at_eos(family_run):
    eos = family_run["model"].generation_config.eos_token_id
    prompt_len = family_run["inputs"]["input_ids"].shape[1]
    for b, trace in enumerate(family_run["traces"]):
        generated = family_run["recorded"][b, prompt_len:].tolist()
        expected = generated.index(eos) + 1 if eos in generated else len(generated)
        assert trace.n_steps == expected


def test_padded_batch_equals_one_by_one(family_run):
    model, processor = family_run["model"], family_run["processor"]
    for b, batched in enumerate(family_run["traces"]):
        with vpstudy.record(model, thresholds=THRESHOLDS) as rec:
            _generate(model, _inputs(model, processor, indices=(b,)), family_run["cache"])
        (single,) = rec.traces()
        assert single.n_steps == batched.n_steps and single.n_visual == batched.n_visual
        np.testing.assert_allclose(single.scores, batched.scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(single.max_head_mass, batched.max_head_mass, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(single.active, batched.active)


def test_model_restored_exactly_after_exit(family_run):
    model, inputs = family_run["model"], family_run["inputs"]
    configs = [model.config, *(getattr(model.config, k) for k in model.config.sub_configs)]
    before = [c._attn_implementation for c in configs]
    with torch.inference_mode():
        logits_before = model(**inputs).logits
    with vpstudy.record(model, layers=[0]):
        assert model.config.get_text_config()._attn_implementation.startswith("vpstudy_hooks_")
        assert model.config.vision_config._attn_implementation == before[configs.index(model.config.vision_config)]
    assert [c._attn_implementation for c in configs] == before
    assert not model._forward_pre_hooks and HookContext.of(model) is None and "generate" not in vars(model)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, logits_before)
    assert torch.equal(_generate(model, inputs, family_run["cache"]), family_run["plain"])


def test_restored_even_when_generation_raises(tiny_dirs):
    model, _ = vpstudy.load(tiny_dirs["llava"])
    with pytest.raises(RecorderError, match="no visual placeholder"):
        with vpstudy.record(model):
            model.generate(input_ids=torch.tensor([[2, 20, 21]]), max_new_tokens=2)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and HookContext.of(model) is None


def test_layer_selection(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    inputs = _inputs(model, processor, indices=(0,))
    with vpstudy.record(model) as full:
        _generate(model, inputs)
    with vpstudy.record(model, layers=[-1]) as last:
        _generate(model, inputs)
    assert last.layers == [1]
    np.testing.assert_array_equal(last.traces()[0].scores[:, 0], full.traces()[0].scores[:, 1])
    with pytest.raises(RecorderError, match=r"layers \[2\] out of range: the text model has 2 layers"):
        vpstudy.record(model, layers=[0, 2])


def test_right_padding_is_refused(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    inputs = _inputs(model, processor, indices=(0, 2))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    shift = (mask == 0).sum(1)
    inputs["input_ids"] = torch.stack([r.roll(-int(s)) for r, s in zip(ids, shift)])
    inputs["attention_mask"] = torch.stack([r.roll(-int(s)) for r, s in zip(mask, shift)])
    inputs["mm_token_type_ids"] = torch.stack([r.roll(-int(s)) for r, s in zip(inputs["mm_token_type_ids"], shift)])
    with pytest.raises(RecorderError, match="right-padded batch"), vpstudy.record(model):
        _generate(model, inputs)


def test_thresholds_parse():
    assert Threshold.parse("0.001").resolve(100) == 0.001
    assert Threshold.parse("2/Nv").resolve(50) == pytest.approx(0.04)
    assert Threshold.parse("2/Nv").label == "2/Nv" and Threshold.parse(0.0005).label == "0.0005"
    for bad in ["abc", "-0.1", "nan"]:
        with pytest.raises(ThresholdError, match="threshold"):
            Threshold.parse(bad)
