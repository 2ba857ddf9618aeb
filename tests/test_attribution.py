"""captum attribution of generated tokens to the visual tokens, and the statistics that compare it
(and the prefill's visual set) with the recorded attention.

Oracles: gradient × activation recomputed with plain torch autograd (a hook makes the features a
leaf); integrated gradients' completeness (attributions sum to f(image) − f(blank)); hand-built
runs with planted attributions and planted shifts, checked against numpy/scipy recomputations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import vpstudy
from vpstudy.attribution import AttributionError, AttributionSettings, attribute_run, attribute_sample, load_attribution
from vpstudy.collect import sample_tables
from vpstudy.datasets import load_dataset
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.recorder import SampleTrace
from vpstudy.rules import Threshold
from vpstudy.runs import RunWriter
from vpstudy.stats.attribution import attribution_agreement_table, relevant_shift_curve, relevant_shift_table
from vpstudy.stats.tables import AnalysisSettings


@pytest.fixture(scope="module")
def tiny(tiny_dirs, tiny_data):
    model, processor = vpstudy.load(tiny_dirs["llava"])
    example = next(iter(load_dataset(tiny_data)))
    spec = model.vpstudy_family
    inputs = dict(prepare_batch(processor, spec, model.config, [format_prompt(processor, spec, example.question)],
                                [example.image()]))  # fmt: skip
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return model, processor, inputs, out[0, inputs["input_ids"].shape[1] :].tolist()


def _autograd_grad_x_activation(model, inputs, generated):
    """The same quantity with torch autograd alone: the projector output made a leaf by a hook."""
    sequence = dict(inputs)
    extra = torch.tensor([generated[:-1]])
    sequence["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    sequence["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    prompt = inputs["input_ids"].shape[1]
    rows = []
    for t, token in enumerate(generated):
        kept: list[torch.Tensor] = []

        def leaf(_m, _i, output):
            output = output.detach().requires_grad_(True)
            kept.append(output)
            return output

        hook = model.model.multi_modal_projector.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logits = model(**sequence, use_cache=False).logits
                logits[0, prompt - 1 + t, token].backward()
        finally:
            hook.remove()
        rows.append((kept[0].grad * kept[0]).sum(-1).reshape(-1).detach().numpy())
    return np.stack(rows)


def test_gradient_times_activation_equals_autograd(tiny):
    model, _, inputs, generated = tiny
    ours = attribute_sample(model, inputs, generated)
    np.testing.assert_allclose(ours, _autograd_grad_x_activation(model, inputs, generated), rtol=1e-4, atol=1e-6)
    assert ours.shape == (len(generated), int((inputs["input_ids"] == model.config.image_token_id).sum()))


def test_integrated_gradients_are_complete(tiny):
    model, _, inputs, generated = tiny
    values = attribute_sample(model, inputs, generated[:1], AttributionSettings("integrated_gradients", n_steps=64))
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**inputs).logits[0, prompt - 1, generated[0]]
        blank = model(**(inputs | {"pixel_values": torch.zeros_like(inputs["pixel_values"])})).logits[0, prompt - 1, generated[0]]
    assert values[0].sum() == pytest.approx(float(full - blank), rel=2e-2, abs=1e-4)


def test_bad_settings_and_pruned_runs_are_refused(tmp_path):
    with pytest.raises(AttributionError, match="attribution method must be one of"):
        AttributionSettings("lime")
    writer = RunWriter(tmp_path / "run", {"kind": "record", "layers": [0], "method": {"name": "topk"}})
    writer.close()
    with pytest.raises(AttributionError, match="recorded under a pruning method"):
        attribute_run(vpstudy.open_run(tmp_path / "run"), None, None, [])


def _planted_run(root, n_samples=6, steps=12, n_visual=40, seed=0):
    """A run whose layer-1 scores at step t peak on tokens that move along the trace (the planted
    shift: step t's peak is at token (4 t) mod N), with an attribution equal to layer 1's scores
    for the first half of the samples and random for the others."""
    from vpstudy.organism.model import build_parts

    dataset = load_dataset(__import__("vpstudy.organism.shipped", fromlist=["x"]).write_eval_set(root / "data", n=n_samples, seed=1))
    tokenizer = build_parts("llava").tokenizer
    rng = np.random.default_rng(seed)
    writer = RunWriter(root / "run", {"kind": "record", "layers": [0, 1]})
    planted = {}
    for i, example in enumerate(dataset):
        scores = np.full((steps, 2, n_visual), 1e-3, dtype=np.float32)
        scores[:, 0] = rng.uniform(0, 0.01, size=(steps, n_visual))
        for t in range(steps):
            scores[t, 1, (4 * t + np.arange(4)) % n_visual] = 0.2
        trace = SampleTrace(layers=[0, 1], thresholds=[Threshold(0.001)], visual_positions=np.arange(n_visual),
                            mass=scores.sum(-1), max_head_mass=scores.sum(-1), active=(scores > 1e-3).sum(-1, keepdims=True),
                            max_scores=scores.max(0), scores=scores, temperatures=[], tau_max_head_mass=np.zeros((steps, 2, 0)))  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids(["count"] * steps)
        writer.write_sample(*sample_tables(example, dataset.name, trace, ids, tokenizer, [5, 8]))
        planted[example.id] = scores[:, 1].copy() if i < n_samples // 2 else rng.normal(size=(steps, n_visual))
    writer.close()
    run = vpstudy.open_run(root / "run")
    from vpstudy.attribution import _array_path, _save

    for sample_id, values in planted.items():
        _save(_array_path(run, sample_id), values.astype(np.float32))
    return run, planted


def test_agreement_table_recomputes_from_the_arrays(tmp_path):
    run, planted = _planted_run(tmp_path)
    settings = AnalysisSettings(n_boot=200, top_k_fraction=0.1)
    table = attribution_agreement_table(run, settings).set_index("layer")
    rhos = []
    for sample_id in run.sample_ids:
        scores = run.scores(sample_id)[:, 1].astype(np.float64)
        rhos.append(np.mean([spearmanr(load_attribution(run, sample_id)[t], scores[t]).statistic for t in range(len(scores))]))
    assert table.loc[1, "spearman"] == pytest.approx(np.mean(rhos), abs=1e-9)
    assert table.loc[1, "spearman_low"] <= table.loc[1, "spearman"] <= table.loc[1, "spearman_high"]
    # the planted half agrees perfectly: its top-k sets coincide
    assert table.loc[1, "top_k_jaccard"] > 0.5 > table.loc[0, "top_k_jaccard"]


def test_relevant_shift_finds_the_planted_shift(tmp_path):
    run, _ = _planted_run(tmp_path)
    settings = AnalysisSettings(n_boot=200, top_k_fraction=0.1)  # k = 4 of 40: the planted peak
    table = relevant_shift_table(run, settings).set_index("layer")
    # layer 1: from step 1 on the peak has left the prefill set (steps 10.. wrap around to it)
    scores = run.scores(run.sample_ids[0])[:, 1].astype(np.float64)
    prefill = np.argsort(-scores[0], kind="stable")[:4]
    expected = [scores[t, prefill].sum() / np.sort(scores[t])[::-1][:4].sum() for t in range(1, len(scores))]
    assert table.loc[1, "coverage"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert table.loc[1, "shifted_share"] > 0.8
    curve = relevant_shift_curve(run, 1, settings)
    assert list(curve["bin"]) == [0, 1, 2, 3, 4] and (curve["coverage"] < 0.6).all()
