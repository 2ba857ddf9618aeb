"""Recording and pruning on a preallocated (static) KV cache: the issue's wrong records, the
shipped organism against transformers' eager attention weights (the oracle), caches that cannot
be read exactly or are too short (one-line errors before anything runs), ``--cache`` on the
command line, and decoding from a prompt already in the cache (``begin``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, StaticCache
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

import vpstudy
from vpstudy.caching import CacheError, resolve_cache
from vpstudy.datasets import load_dataset
from vpstudy.organism.shipped import eval_set_path, organism_dir
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.pruning import Pruner, VisionPulse
from vpstudy.rules import anchor_layer
from vpstudy.testing import make_tiny, make_tiny_dataset

CACHES = ("dynamic", "static")


def _batch(model, processor, examples):
    spec = model.vpstudy_family
    prompts = [format_prompt(processor, spec, ex.question) for ex in examples]
    return prepare_batch(processor, spec, model.config, prompts, [ex.image() for ex in examples])


def _eager_rows(path, inputs, new_tokens, layers=None):
    """Head-mean eager attention probabilities of the last query row per step, [B][steps, layers, T]
    (transformers' own weights, default cache), and the generated sequences."""
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    out = eager.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)  # fmt: skip
    layers = range(len(out.attentions[0])) if layers is None else layers
    return out.sequences, [[[out.attentions[t][layer][b, :, -1, :].float().mean(0) for layer in layers]
                            for t in range(len(out.attentions))] for b in range(out.sequences.shape[0])]  # fmt: skip


def _check_against_eager(traces, rows):
    for trace, sample in zip(traces, rows, strict=True):
        expected = np.stack([np.stack([r[trace.visual_positions].numpy() for r in step])
                             for step in sample[: trace.n_steps]])  # fmt: skip
        np.testing.assert_allclose(trace.scores, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(trace.mass, expected.sum(-1), atol=1e-5, rtol=0)


def test_the_issues_case_a_static_cache_records_what_eager_attention_gives(tmp_path):
    """Issue 17: a tiny LLaVA (seed 2), two samples of the tiny dataset (no padding: the prefill
    gets no mask), 8 new tokens. The static cache's step-0 masses were off by up to 0.15."""
    path = make_tiny("llava", tmp_path / "llava", seed=2)
    model, processor = vpstudy.load(path)
    inputs = _batch(model, processor, list(load_dataset(make_tiny_dataset(tmp_path / "data", n=2))))
    assert bool(inputs["attention_mask"].all())  # the case transformers passes no prefill mask for
    traces, sequences = {}, {}
    for cache in CACHES:
        with vpstudy.record(model, layers=[0, 1]) as rec:
            sequences[cache] = model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation=cache)
        traces[cache] = rec.traces()
    eager_sequences, rows = _eager_rows(path, inputs, 8, layers=[0, 1])
    assert torch.equal(sequences["static"], sequences["dynamic"]) and torch.equal(sequences["static"], eager_sequences)
    for cache in CACHES:
        _check_against_eager(traces[cache], rows)
    for static, dynamic in zip(traces["static"], traces["dynamic"], strict=True):
        np.testing.assert_allclose(static.mass, dynamic.mass, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def organism():
    model, processor = vpstudy.load(organism_dir("llava"))
    examples = list(load_dataset(eval_set_path(), limit=5))
    return model, processor, examples


@pytest.mark.parametrize("rows", [(0, 1, 2, 3, 4), (2,)], ids=["left-padded-batch", "one-row"])
def test_the_organism_records_on_a_static_cache_what_eager_attention_gives(organism, rows):
    model, processor, examples = organism
    inputs = _batch(model, processor, [examples[i] for i in rows])
    eager_sequences, eager = _eager_rows(organism_dir("llava"), inputs, 12)
    for cache in CACHES:
        with vpstudy.record(model) as rec:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, cache_implementation=cache)
        assert torch.equal(out, eager_sequences), cache
        _check_against_eager(rec.traces(), eager)


def test_the_organism_is_evaluated_alike_on_both_caches(organism):
    """What ``vpstudy evaluate`` runs (VisionPulse in mask mode under the recorder) and the
    physical fast path: the same tokens, masses and kept sets on a static cache as on a dynamic one."""
    model, processor, examples = organism
    inputs = _batch(model, processor, examples)
    anchor = anchor_layer(model.config.get_text_config().num_hidden_layers)
    results = {}
    for cache in CACHES:
        method = VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=anchor)
        with vpstudy.record(model) as rec, Pruner(model, [method], mode="mask") as pruner:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, cache_implementation=cache)
        results[cache] = out, rec.traces(), pruner.kept()
    with Pruner(model, [VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=anchor)], mode="physical") as pruner:
        physical = model.generate(**inputs, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert pruner.backend.name == "cpu"
    (dense_out, dense_traces, dense_kept), (out, traces, kept) = results["dynamic"], results["static"]
    assert torch.equal(out, dense_out) and torch.equal(physical, dense_out)
    for a, b in zip(traces, dense_traces, strict=True):
        np.testing.assert_allclose(a.mass, b.mass, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6, rtol=0)
    for a, b, c in zip(kept, dense_kept, pruner.kept(), strict=True):
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(c.masks[1:], b.masks[1:])  # physical mode: decode steps
        assert (a.counts[1:, anchor:] < a.masks.shape[-1]).any()  # something was pruned


# --- caches that cannot be read, or are too short: one line, before anything runs -------------------


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """A tiny Qwen2-VL whose second text layer has a sliding window (its cache slots are a ring)."""
    path = make_tiny("qwen2_vl", tmp_path_factory.mktemp("sliding"), seed=0,
                     text_overrides=dict(use_sliding_window=True, sliding_window=8, max_window_layers=1))  # fmt: skip
    return path, *vpstudy.load(path)


class _Forwards:
    """Counts forwards of a model's first text layer (did any work start?)."""

    def __init__(self, model):
        self.n = 0
        self.hook = model.vpstudy_family.text_layer_modules(model)[0].register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1


def _owners(model):
    return [lambda: vpstudy.record(model), lambda: Pruner(model, [VisionPulse(anchor=1)], mode="physical")]


def test_a_cache_whose_slots_are_not_positions_is_refused_before_any_work(sliding, tiny_data):
    _, model, processor = sliding
    inputs = _batch(model, processor, list(load_dataset(tiny_data, limit=1)))
    for name in ("auto", "static", "dynamic"):
        with pytest.raises(CacheError, match=f"cache {name}: Qwen2VLForConditionalGeneration cannot be recorded "
                                             "exactly .*SlidingWindowLayer layers"):  # fmt: skip
            resolve_cache(model, name)
    forwards = _Forwards(model)
    for make in _owners(model):
        for cache in CACHES:
            with pytest.raises(CacheError, match=r"^the (recorder|pruner) cannot read a \w+Cache with "
                                                 r"\w+SlidingWindowLayer layers exactly"), make():  # fmt: skip
                model.generate(**inputs, max_new_tokens=3, cache_implementation=cache)
        user_cache = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=8) for _ in range(2)])
        with pytest.raises(CacheError, match="DynamicSlidingWindowLayer layers exactly"), make():
            model.generate(**inputs, max_new_tokens=3, past_key_values=user_cache)
    assert forwards.n == 0
    with pytest.raises(CacheError, match="cache must be one of auto, static, dynamic, got 'paged'"):
        resolve_cache(model, "paged")


def test_a_static_cache_too_short_for_the_generation_is_refused_before_any_work(tiny_dirs, tiny_data):
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _batch(model, processor, list(load_dataset(tiny_data, limit=1)))
    prompt = inputs["input_ids"].shape[1]
    forwards = _Forwards(model)
    for make in _owners(model):
        short = StaticCache(config=model.config, max_cache_len=prompt + 4)
        message = (rf"^the (recorder|pruner): the static cache holds {prompt + 4} slots; a {prompt}-token prompt "
                   rf"and 6 new tokens need {prompt + 5} ")
        with pytest.raises(CacheError, match=message):
            with make():
                model.generate(**inputs, max_new_tokens=6, past_key_values=short)
        with make():  # exactly long enough: prompt + max_new_tokens - 1 slots
            model.generate(**inputs, max_new_tokens=5, past_key_values=StaticCache(config=model.config,
                                                                                 max_cache_len=prompt + 4))  # fmt: skip
    assert forwards.n == 2 * 5  # only the two generations that fit ran (5 forwards each)
    assert "generate" not in vars(model)  # the checked generate is gone after the with blocks


def test_right_padding_is_refused_on_a_static_cache_too(tiny_dirs):
    """On a static cache generate prepares the prefill mask as [B, 1, P, T] per attention type."""
    from test_recorder import _inputs

    model, processor = vpstudy.load(tiny_dirs["internvl"])
    inputs = _inputs(model, processor, indices=(0, 2))
    shift = (inputs["attention_mask"] == 0).sum(1)
    for key in ("input_ids", "attention_mask"):
        inputs[key] = torch.stack([r.roll(-int(s)) for r, s in zip(inputs[key], shift, strict=True)])
    with pytest.raises(vpstudy.recorder.RecorderError, match="right-padded batch"), vpstudy.record(model):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


# --- the command line -----------------------------------------------------------------------------


def _run(cli, out, *extra):
    return cli.main(["record", "--model", str(extra[0]), "--data", str(extra[1]), "--out", str(out), "--limit", "3",
                     "--max-new-tokens", "5", "--batch-size", "3", "--no-progress", *extra[2:]])  # fmt: skip


def test_record_and_evaluate_choose_the_cache_and_record_it_in_the_manifest(tiny_dirs, tiny_data, tmp_path, capsys):
    from vpstudy import cli

    runs = {}
    for flag in ("auto", "static", "dynamic"):
        out = tmp_path / flag
        assert _run(cli, out, tiny_dirs["qwen2_vl"], tiny_data, "--cache", flag) == 0
        runs[flag] = vpstudy.open_run(out)
        assert runs[flag].manifest["cache"] == ("static" if flag == "auto" else flag)
    for flag in ("static", "auto"):
        a, b = runs[flag].steps, runs["dynamic"].steps
        assert a["token_id"].tolist() == b["token_id"].tolist()
        np.testing.assert_allclose(a["mass"], b["mass"], atol=1e-6, rtol=0)
    kept = {}
    for flag in ("static", "dynamic"):
        out = tmp_path / f"eval-{flag}"
        assert cli.main(["evaluate", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(tiny_data), "--out", str(out),
                         "--method", "visionpulse", "--set", "tau=0.4", "b_min=0.05", "b_max=0.3", "--limit", "3",
                         "--max-new-tokens", "5", "--batch-size", "3", "--no-progress",
                         "--cache", flag]) == 0  # fmt: skip
        kept[flag] = vpstudy.open_run(out).steps
        assert json.loads((out / "manifest.json").read_text())["cache"] == flag
    assert kept["static"]["kept"].tolist() == kept["dynamic"]["kept"].tolist()
    assert (kept["static"]["kept"] < kept["static"]["kept"].max()).any()  # something was pruned
    capsys.readouterr()


def test_a_cache_the_model_cannot_use_is_a_one_line_error_that_writes_nothing(sliding, tiny_data, tmp_path, capsys):
    from vpstudy import cli

    path = sliding[0]
    out = tmp_path / "run"
    assert _run(cli, out, path, tiny_data, "--cache", "static") == 2
    err = capsys.readouterr().err
    assert err.startswith("vpstudy record: error: cache static: Qwen2VLForConditionalGeneration cannot be recorded")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(SystemExit) as exit_:
        _run(cli, out, path, tiny_data, "--cache", "paged")
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# --- a prompt already in the cache ----------------------------------------------------------------


def test_decoding_from_a_prefilled_cache_records_and_prunes_the_steps_generate_does(tiny_dirs, tiny_data):
    """One prefill, then decode steps under ``Recorder.begin`` / ``Pruner.begin``: the same masses
    and kept sets as the decode steps of a full ``generate`` (whose step 0 is the prefill's)."""
    model, processor = vpstudy.load(tiny_dirs["llava"])
    inputs = _batch(model, processor, list(load_dataset(tiny_data, limit=1)))
    steps = 5
    method = VisionPulse(tau=0.4, b_min=0.05, b_max=0.3, anchor=1)
    with torch.inference_mode():
        with vpstudy.record(model) as rec, Pruner(model, [method], mode="mask") as pruner:
            full = model.generate(**inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                                  cache_implementation="static")  # fmt: skip
        expected, expected_kept = rec.traces()[0], pruner.kept()[0]
        prompt = inputs["input_ids"].shape[1]
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
        token = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with vpstudy.record(model) as rec, Pruner(model, [method], mode="mask") as pruner:
            rec.begin(inputs["input_ids"], inputs["attention_mask"])
            pruner.begin(inputs["input_ids"])
            tokens = []
            for _ in range(steps):
                mask = torch.ones(1, prompt + len(tokens) + 1, dtype=torch.long)
                token = model(input_ids=token, attention_mask=mask, past_key_values=cache,
                              use_cache=True).logits[:, -1:].argmax(-1)  # fmt: skip
                tokens.append(int(token))
    assert tokens == full[0, prompt + 1 :].tolist()
    (trace,), (kept,) = rec.traces(), pruner.kept()
    assert trace.n_steps == steps
    np.testing.assert_allclose(trace.mass, expected.mass[1:], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(kept.masks, expected_kept.masks[1:])


def test_written_slots_hand_the_base_backend_what_a_dynamic_cache_would():
    from vpstudy.hooks import WrittenSlots

    key, value = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    slots = WrittenSlots()
    slots.start(7)
    decode = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    decode[..., :7] = True  # only the unwritten tail is hidden: no mask at all, as a dynamic cache passes
    k, v, m = slots.view(key, value, decode, queries=1)
    assert m is None and torch.equal(k, key[:, :, :7]) and k.data_ptr() == key.data_ptr()  # a view
    padded = decode.clone()
    padded[1, ..., :2] = False  # left padding stays masked
    assert torch.equal(slots.view(key, value, padded, queries=1)[2], padded[..., :7])
    prefill = torch.ones(2, 1, 3, 10, dtype=torch.bool)
    assert slots.view(key, value, prefill, queries=3)[2].shape == (2, 1, 3, 7)  # a prefill keeps its mask
    flash = torch.ones(2, 10, dtype=torch.long)  # not transformers' 4-D mask: the call is left as it was
    assert slots.view(key, value, flash, queries=1)[0] is key
    slots.start(10)
    assert slots.view(key, value, decode, queries=1)[0] is key  # every slot written: nothing to cut
