"""The hook context a model's recorder and pruner share (vpstudy.hooks.HookContext): one registered
attention function, one forward pre-hook, one checked generate; the pruner sees each attention call
before the recorder whatever the order they entered in; the model is restored exactly when the
last one leaves, in either order; the shared padding mask on a static cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import vpstudy
from test_recorder import _inputs
from vpstudy.hooks import CONTEXT_ATTR, HookContext, padding_mask
from vpstudy.pruning import Pruner, PruningError, TopK, VisionPulse
from vpstudy.pruning.methods import Decision
from vpstudy.recorder import RecorderError

NEW_TOKENS = 4


def _configs(model):
    return [
        (c, c._attn_implementation)
        for c in [model.config, *(getattr(model.config, k) for k in model.config.sub_configs)]
    ]


def _assert_restored(model, configs):
    assert [(c, c._attn_implementation) for c, _ in configs] == configs
    assert not model._forward_pre_hooks and "generate" not in vars(model) and HookContext.of(model) is None
    assert not any(CONTEXT_ATTR in m.__dict__ for m in model.modules())


@dataclass
class _PrefixSpy(TopK):
    """Top-K that keeps what each decode decision saw of the prefix (attribution_oracle's input)."""

    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def keep(self, stage: int, d: Decision) -> torch.Tensor:
        self.seen.append((d.step, d.prefix.clone(), d.prefix_mask.clone()))
        return super().keep(stage, d)


def test_padding_mask_reads_every_form_of_mask():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 6]])
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    visible = pad.bool()[:, None, None, :] & torch.ones(4, 6, dtype=torch.bool).tril()[None, None, :, :4]
    four_d = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    four_d[..., :4] = visible  # a static cache's prefill mask: 6 slots, 4 written
    additive = torch.zeros(2, 1, 4, 6).masked_fill(~four_d, torch.finfo(torch.float32).min)  # eager's form
    for mask in (
        pad,
        four_d,
        additive,
        {"full_attention": four_d},
        {"sliding_attention": None, "full_attention": four_d},
    ):
        assert torch.equal(padding_mask(ids, mask), pad)
    assert torch.equal(padding_mask(ids, None), torch.ones_like(ids))  # no mask: every token attended
    assert torch.equal(padding_mask(ids, object(), pad_token_id=0), pad)  # unreadable: the left run of pad ids
    assert torch.equal(padding_mask(ids, object()), torch.ones_like(ids))
    # a decode step (offset 4, one token) and a later prefill chunk (the last columns of a 2-D mask)
    step = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    step[..., :4], step[..., 4] = pad.bool()[:, None, None, :], True
    assert torch.equal(padding_mask(ids[:, :1], step, offset=4), torch.ones(2, 1, dtype=torch.long))
    assert torch.equal(padding_mask(ids[:, 2:], pad), pad[:, 2:])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # a 4-D prefill mask; a dict of them
def test_a_left_padded_batch_keeps_its_padding_mask_on_a_static_cache(tiny_dirs, family):
    """generate hands a static cache's prefill a [B, 1, P, T] mask (or a dict of them), not the
    [B, P] padding mask: the shared state reads the padding from it, so a method that replays
    the prefix gets the same tokens and mask on both caches: the prompt's padding, then ones."""
    model, processor = vpstudy.load(tiny_dirs[family])
    inputs = _inputs(model, processor)
    prompt_mask = inputs["attention_mask"]
    assert not bool(prompt_mask.all())  # left-padded
    seen = {}
    for cache in ("dynamic", "static"):
        spy = _PrefixSpy(0.25, anchor=1)
        with torch.inference_mode(), Pruner(model, [spy]):
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation=cache)
            state = HookContext.of(model).state
            assert torch.equal(state.token_mask[:, : prompt_mask.shape[1]], prompt_mask)
        seen[cache] = spy.seen
    assert [s[0] for s in seen["static"]] == list(range(1, NEW_TOKENS))  # one decision per decode step
    for (step, prefix, mask), (_, dynamic_prefix, dynamic_mask) in zip(seen["static"], seen["dynamic"], strict=True):
        expected = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], step, dtype=prompt_mask.dtype)], dim=1)
        assert torch.equal(mask, expected) and torch.equal(dynamic_mask, expected)
        assert torch.equal(prefix, dynamic_prefix) and prefix.shape == expected.shape


def _record_and_prune(model, inputs, recorder_first):
    recorder = vpstudy.record(model, layers=[0, 1])
    pruner = Pruner(model, [VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=1)], mode="mask")
    first, second = (recorder, pruner) if recorder_first else (pruner, recorder)
    with torch.inference_mode(), first, second:
        name = model.config.get_text_config()._attn_implementation
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    return name, out, recorder.traces(), pruner.kept()


def test_the_recorder_sees_the_pruned_attention_whichever_entered_first(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _inputs(model, processor)
    configs = _configs(model)
    name, out, traces, kept = _record_and_prune(model, inputs, recorder_first=True)
    assert name == "vpstudy_hooks_sdpa"  # one registered function, not one per participant
    _assert_restored(model, configs)
    name_b, out_b, traces_b, kept_b = _record_and_prune(model, inputs, recorder_first=False)
    assert name_b == name and torch.equal(out, out_b)
    for a, b in zip(traces, traces_b, strict=True):
        np.testing.assert_array_equal(a.mass, b.mass)
        np.testing.assert_array_equal(a.scores, b.scores)
    for a, b in zip(kept, kept_b, strict=True):
        np.testing.assert_array_equal(a.masks, b.masks)
    assert (kept[0].counts[1:, 1] < kept[0].masks.shape[-1]).any()  # something was pruned
    with torch.inference_mode(), vpstudy.record(model, layers=[0, 1]) as dense:
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    # at the first decode step (the same input in both runs) the anchor layer's mass is the pruned model's
    assert abs(dense.traces()[0].mass[1, 1] - traces[0].mass[1, 1]) > 1e-4
    _assert_restored(model, configs)


def test_participants_may_leave_in_any_order(tiny_dirs):
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _inputs(model, processor)
    configs = _configs(model)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.inference_mode():
        plain = model.generate(**inputs, **kwargs)
        with Pruner(model, [TopK(0.25, anchor=1)]) as alone:
            pruned = model.generate(**inputs, **kwargs)
        recorder, pruner = vpstudy.record(model), Pruner(model, [TopK(0.25, anchor=1)])
        recorder.__enter__()
        pruner.__enter__()
        context = HookContext.of(model)
        assert context.participants == [recorder, pruner] and HookContext.of(model) is context
        recorder.__exit__(None, None, None)  # the first in leaves first: the pruner goes on alone
        assert HookContext.of(model) is context and context.participants == [pruner]
        assert torch.equal(model.generate(**inputs, **kwargs), pruned)
        for a, b in zip(pruner.kept(), alone.kept(), strict=True):
            np.testing.assert_array_equal(a.masks, b.masks)
        pruner.__exit__(None, None, None)
        _assert_restored(model, configs)
        assert torch.equal(model.generate(**inputs, **kwargs), plain)


def test_stacking_rules_are_one_line_errors_that_leave_the_model_as_it_was(tiny_dirs):
    model, _ = vpstudy.load(tiny_dirs["llava"])
    configs = _configs(model)
    cases = [
        (lambda: vpstudy.record(model), lambda: vpstudy.record(model), RecorderError,
         "a vpstudy recorder is already installed on this model"),
        (lambda: Pruner(model, [TopK(0.25)]), lambda: Pruner(model, [TopK(0.25)]), PruningError,
         "a vpstudy pruner is already installed on this model; pass all methods to one Pruner"),
        (lambda: vpstudy.record(model), lambda: Pruner(model, [TopK(0.25)], mode="physical"), PruningError,
         "physical mode cannot run under the recorder (it changes the keys); use mode='mask'"),
        (lambda: Pruner(model, [TopK(0.25)], mode="physical"), lambda: vpstudy.record(model), RecorderError,
         "the recorder cannot run with a physical-mode pruner (it changes the keys); use mode='mask'"),
    ]  # fmt: skip
    for outer, inner, error, message in cases:
        with pytest.raises(error) as raised, outer(), inner():
            pass
        assert str(raised.value) == message
        _assert_restored(model, configs)


def test_a_participant_that_joins_after_another_began_a_prefilled_generation_begins_it_too(tiny_dirs):
    """The benchmark's pattern: the recorder enters and begins, then the pruner enters and begins."""
    from transformers import StaticCache

    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _inputs(model, processor, indices=(0,))
    prompt, steps = inputs["input_ids"].shape[1], 3
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
        token = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with vpstudy.record(model) as recorder:
            recorder.begin(inputs["input_ids"], inputs["attention_mask"])
            with Pruner(model, [VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=1)]) as pruner:
                pruner.begin(inputs["input_ids"])
                for t in range(steps):
                    mask = torch.ones(1, prompt + t + 1, dtype=torch.long)
                    logits = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
                    token = logits[:, -1:].argmax(-1)
    (trace,), (kept,) = recorder.traces(), pruner.kept()
    assert trace.n_steps == steps and kept.counts.shape[0] == steps
    assert (kept.counts[:, 1] < kept.masks.shape[-1]).all()  # every decode step was pruned at the anchor
