"""DSTP's re-selection checked by an independent reading on transformers' own eager attention.

The pruned generation's kept sets and re-selection counts are recomputed from scratch: the
generated sequence is teacher-forced through the eager model with ``output_attentions`` (the
oracle; layers below the anchor are never pruned, so the anchor layer's attention of every step
is the dense one), and the rule is re-implemented here in numpy: the prefill's top-K by head-mean
logit (log-probabilities differ from logits by a per-row constant, so they rank alike), then at
each decode step a new top-K whenever 1 − cos(p̄_t, p̄_ref) exceeds the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

import vpstudy
from vpstudy.pruning import DSTP, Pruner
from vpstudy.rules import keep_count

from vpstudy.datasets import load_dataset
from vpstudy.organism.shipped import eval_set_path, organism_dir
from vpstudy.processing import format_prompt, prepare_batch


def _independent_dstp(probs: np.ndarray, k: int, threshold: float) -> tuple[list[np.ndarray], int]:
    """Kept sets per step (0 = prefill) and the number of re-selections, from per-head
    probabilities at the visual keys [S, H, N] (the softmax over every key)."""
    mean_p = probs.mean(1)
    score = np.log(np.clip(probs, 1e-300, None)).mean(1)  # ranks like the head-mean logit

    def top(t: int) -> np.ndarray:
        return np.sort(np.argsort(-score[t], kind="stable")[:k])

    current, reference, count, sets = top(0), mean_p[0], 0, []
    sets.append(current)
    for t in range(1, len(probs)):
        cos = mean_p[t] @ reference / (np.linalg.norm(mean_p[t]) * np.linalg.norm(reference))
        if 1 - cos > threshold:
            current, reference, count = top(t), mean_p[t], count + 1
        sets.append(current)
    return sets, count


def _dense_probs(eager, model, inputs, sequence, anchor):
    """Per-head probabilities at the visual keys of the anchor layer, per step: [S, H, N]."""
    prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        attn = eager(input_ids=sequence, pixel_values=inputs["pixel_values"], output_attentions=True).attentions[anchor]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    steps = sequence.shape[1] - prompt  # the last generated token's own row is never a query
    return attn[0][:, prompt - 1 : prompt - 1 + steps][:, :, visual].permute(1, 0, 2).double().numpy()


def _organism_inputs(model, processor, row):
    example = list(load_dataset(eval_set_path(), limit=3))[row]
    spec = model.vpstudy_family
    return prepare_batch(processor, spec, model.config, [format_prompt(processor, spec, example.question)],
                         [example.image()])  # fmt: skip


@pytest.mark.parametrize("threshold", [0.0, "median", 0.9])
def test_dstp_reselects_as_an_independent_reading_of_eager_attention(threshold):
    """On the shipped organism (its attention moves between steps, unlike a random model's)."""
    path = organism_dir("llava")
    model, processor = vpstudy.load(path, dtype=torch.float64)
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float64).eval()
    anchor, partial = 4, False
    for row in range(3):
        inputs = _organism_inputs(model, processor, row)
        if threshold == "median":  # a threshold that some steps cross and others do not
            with torch.inference_mode():
                dense = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            mean_p = _dense_probs(eager, model, inputs, dense, anchor).mean(1)
            shifts = [1 - mean_p[t] @ mean_p[0] / np.linalg.norm(mean_p[t]) / np.linalg.norm(mean_p[0])
                      for t in range(1, len(mean_p))]  # fmt: skip
            ordered = np.sort(shifts)  # a midpoint between two shifts: no step sits on the threshold
            value = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        else:
            value = threshold
        method = DSTP(ratio=0.25, threshold=value, anchor=anchor)
        with torch.inference_mode(), Pruner(model, [method]) as pruner:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        kept = pruner.kept()[0]
        probs = _dense_probs(eager, model, inputs, out, anchor)
        steps = len(probs)
        sets, count = _independent_dstp(probs, int(keep_count(0.25, probs.shape[-1])), value)
        assert method.reselections == [count]
        partial |= 0 < count < steps - 1
        boundary = kept.boundaries.index(anchor)
        for t in range(1, steps):  # decode steps (step 0's set acts on generated tokens only)
            np.testing.assert_array_equal(np.flatnonzero(kept.masks[t, boundary]), sets[t], err_msg=f"step {t}")
        if threshold == 0.0:
            assert count == steps - 1  # every step's attention differs from the last one's
    if threshold == "median":
        assert partial, "the median threshold should make some steps re-select and others not"
