"""Sampled decoding (vpstudy/sampling.py) as the paper ran Qwen3-VL-Thinking, repeats, and long traces:
each sample draws from its own seeded stream (so batch companions, resumes and ranks do not
change its tokens), the draws follow transformers' own warped distribution, `--repeats` stores
`<id>#r<k>` samples whose eval.json interval resamples the examples, and `--max-new-tokens
16384` is accepted end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import vpstudy
from vpstudy.cli import main
from vpstudy.collect import REPEAT_MARK, repeat_columns, run_examples
from vpstudy.evaluation import repeats_summary, summarize
from vpstudy.runs import RunWriter
from vpstudy.sampling import PAPER_SAMPLING, Sampling, SamplingError, sample_seed


def test_sample_seeds_depend_on_the_run_seed_and_the_sample_id_only():
    assert sample_seed(0, "a") == sample_seed(0, "a") and 0 <= sample_seed(0, "a") < 2**63
    assert len({sample_seed(s, i) for s in (0, 1) for i in ("a", "b", "a#r1")}) == 6


def test_the_sampler_draws_from_transformers_warped_distribution():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    settings = Sampling(**PAPER_SAMPLING)
    ids = torch.zeros(1, 1, dtype=torch.long)
    expected = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(ids, expected)
    expected = torch.softmax(expected, -1)[0].numpy()
    sampler = settings.processor([sample_seed(0, "x")])
    draws = np.array([int(sampler.draw(ids, logits.clone())[0]) for _ in range(4000)])
    freq = np.bincount(draws, minlength=12) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))  # never a token top-k/top-p removed
    np.testing.assert_allclose(freq, expected, atol=0.025)
    out = sampler(ids, logits.clone())  # what generate's greedy step sees: the drawn token alone is finite
    assert torch.isfinite(out).sum() == 1 and out.max() == 0


def test_a_rows_draws_do_not_depend_on_its_batch_companions():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    ids = torch.zeros(3, 1, dtype=torch.long)
    together = Sampling(temperature=1.3).processor([11, 22, 33])
    alone = Sampling(temperature=1.3).processor([22])
    for _ in range(20):
        assert int(together.draw(ids, logits)[1]) == int(alone.draw(ids[1:2], logits[1:2])[0])


def test_bad_sampling_settings_are_one_line_errors():
    with pytest.raises(SamplingError, match=r"^--temperature must be a number > 0"):
        Sampling(temperature=0.0)
    with pytest.raises(SamplingError, match=r"^--top-p must be in \(0, 1\]"):
        Sampling(top_p=1.5)
    with pytest.raises(SamplingError, match=r"^--top-k must be an integer >= 0"):
        Sampling(top_k=-1)


def test_repeats_are_stored_as_samples_of_their_example():
    import dataclasses

    @dataclasses.dataclass
    class E:
        id: str
        question: str = "q"

    examples = run_examples([E("a"), E("b#r1x")], repeats=3)
    assert [e.id for e in examples] == ["a#r0", "a#r1", "a#r2", "b#r1x#r0", "b#r1x#r1", "b#r1x#r2"]
    assert repeat_columns("b#r1x#r2", 3) == {"source_id": "b#r1x", "repeat": 2} and repeat_columns("a", 1) == {}
    assert REPEAT_MARK == "#r"


def test_accuracy_over_repeats_resamples_the_examples(tmp_path):
    """10 examples x 4 repeats, each example right on every repeat or on none: the examples'
    interval (10 outcomes) is wider than one over the 40 samples would be."""
    writer = RunWriter(tmp_path / "run", {"kind": "record", "layers": [0]})
    right = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    for e, ok in enumerate(right):
        for k in range(4):
            sid = f"ex{e}#r{k}"
            score = float(ok) if k < 3 else 1.0  # repeat 3 is always right
            sample = {"sample_id": sid, "source_id": f"ex{e}", "repeat": k, "score": score, "correct": score == 1.0,
                      "steps": 2, "n_visual": 4, "generated_text": "x", "batch": e, "batch_prefill_s": 0.1,
                      "batch_decode_s": 0.1, "batch_decode_steps": 1}  # fmt: skip
            steps = pd.DataFrame({"sample_id": [sid] * 2, "step": [0, 1], "layer": [0, 0], "mass": [0.5, 0.5]})
            writer.write_sample(sample, steps, {})
    run = vpstudy.open_run(tmp_path / "run")
    result = summarize(run)
    per_example = np.array([(3 * ok + 1) / 4 for ok in right])
    assert result["accuracy"] == pytest.approx(per_example.mean())
    assert result["repeats"]["accuracy_per_repeat"] == {"0": 0.7, "1": 0.7, "2": 0.7, "3": 1.0}
    low, high = result["accuracy_ci95"]
    rng = np.random.default_rng(0)
    naive = [rng.choice(np.repeat(per_example, 4), 40).mean() for _ in range(2000)]  # resampling single samples
    assert low < per_example.mean() < high
    assert high - low > 1.5 * (np.quantile(naive, 0.975) - np.quantile(naive, 0.025))
    assert repeats_summary(run.samples.set_index("sample_id"))["repeats"]["examples"] == 10


def test_repeats_without_sampling_is_one_line_and_writes_nothing(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(["record", "--model", str(tiny_dirs["llava"]), "--data", str(tiny_data), "--out", str(out),
                 "--repeats", "3"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--repeats 3" in err and "--paper-sampling" in err
    assert not out.exists()


def test_sampled_record_resumes_to_the_same_tokens(tmp_path, tiny_dirs, tiny_data, capsys):
    """A sampled run killed after its first batch and resumed draws what an uninterrupted one draws."""
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(tiny_data), "--max-new-tokens", "8",
            "--batch-size", "2", "--sample", "--temperature", "1.5", "--top-k", "0", "--repeats", "2"]  # fmt: skip
    assert main(["record", *args, "--out", str(tmp_path / "whole"), "--limit", "3"]) == 0
    assert main(["record", *args, "--out", str(tmp_path / "resumed"), "--limit", "1"]) == 0  # one batch: #r0, #r1
    assert main(["record", *args, "--out", str(tmp_path / "resumed"), "--limit", "3"]) == 0
    whole, resumed = vpstudy.open_run(tmp_path / "whole"), vpstudy.open_run(tmp_path / "resumed")
    assert whole.sample_ids == resumed.sample_ids and len(whole.sample_ids) == 6
    pd.testing.assert_frame_equal(whole.steps, resumed.steps, check_exact=True)
    generation = whole.manifest["generation"]
    assert generation["do_sample"] is True and generation["temperature"] == 1.5 and generation["top_k"] == 0
    assert generation["repeats"] == 2 and generation["top_p"] == 1.0  # the tiny model's generation config: unset


def test_max_new_tokens_16384_is_accepted(tmp_path, tiny_dirs, tiny_data, capsys):
    """A model whose every token ends the trace: the 16,384-token budget (prompt + 16,384 static
    cache slots) reaches generate, the manifest records it, each trace stops at its first step."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llava"], model)
    config = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": list(range(vocab))}))
    out = tmp_path / "run"
    assert main(["record", "--model", str(model), "--data", str(tiny_data), "--out", str(out), "--limit", "2",
                 "--max-new-tokens", "16384", "--cache", "static", "--paper-sampling"]) == 0  # fmt: skip
    run = vpstudy.open_run(out)
    assert run.manifest["generation"]["max_new_tokens"] == 16384 and run.manifest["cache"] == "static"
    assert list(run.samples["steps"]) == [1, 1]
