"""Reasoning traces (``<think>…</think>``): which steps reason, and the mass contrast between phases.

The oracle for the contrast's effect size is scipy's Mann–Whitney U on the pooled steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import vpstudy
from vpstudy.annotations import think_phases
from vpstudy.collect import sample_tables
from vpstudy.datasets import Example
from vpstudy.recorder import SampleTrace
from vpstudy.rules import Threshold
from vpstudy.runs import RunWriter
from vpstudy.stats.tables import AnalysisError, think_contrast_table

LAYERS = [0, 1]


class WordTokenizer:
    """A word-level tokenizer: enough of transformers' interface for :func:`sample_tables`."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = sorted(set(words))

    def convert_tokens_to_ids(self, words: list[str]) -> list[int]:
        return [self.vocab.index(w) for w in words]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.convert_ids_to_tokens(ids))


# (sample id, generated words, the prompt opened <think>, expected phase per step)
TRACES = [
    ("closes", "look at the bar </think> 12".split(), True, ["think"] * 5 + ["answer"]),
    ("opens", "<think> the bar </think> 7".split(), False, ["think"] * 4 + ["answer"]),
    ("cut", "still reading the chart".split(), True, ["think"] * 4),
    ("plain", "12 units".split(), False, ["answer"] * 2),
]


def _write_run(root: Path, masses: dict[str, np.ndarray], traces: list = TRACES) -> vpstudy.Run:
    tokenizer = WordTokenizer([w for _, words, _, _ in traces for w in words])
    writer = RunWriter(root / "run", {"kind": "record", "layers": LAYERS})
    for sample_id, words, thinking, _ in traces:
        steps, n_visual = len(words), 4
        mass = masses[sample_id]
        scores = np.repeat((mass / n_visual)[:, None, None], len(LAYERS), axis=1).repeat(n_visual, axis=2)
        trace = SampleTrace(
            layers=LAYERS, thresholds=[Threshold(0.001)], visual_positions=np.arange(n_visual),
            mass=scores.sum(-1).astype(np.float32), max_head_mass=scores.sum(-1).astype(np.float32),
            active=np.ones((steps, len(LAYERS), 1), dtype=np.int32), max_scores=scores.max(0).astype(np.float32),
            scores=scores.astype(np.float32),
        )  # fmt: skip
        example = Example(sample_id, "how tall?", "12", None, {}, f"fixture:{sample_id}", "x.png", root)
        ids = tokenizer.convert_tokens_to_ids(words)
        writer.write_sample(*sample_tables(example, "fixture", trace, ids, tokenizer, [2, 2], thinking=thinking))
    return vpstudy.open_run(root / "run")


@pytest.fixture
def masses() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for sample_id, _, _, phases in TRACES:
        think = np.array([p == "think" for p in phases])
        out[sample_id] = np.where(think, rng.uniform(0.05, 0.4, think.size), rng.uniform(0.3, 0.9, think.size))
    return out


def test_phases_follow_the_think_block_the_prompt_or_the_trace_opened(tmp_path, masses):
    phases = think_phases(_write_run(tmp_path, masses))
    for sample_id, _, _, expected in TRACES:
        got = phases[phases["sample_id"] == sample_id].sort_values("step")
        assert got["step"].tolist() == list(range(len(expected)))
        assert got["phase"].tolist() == expected, sample_id


def test_think_contrast_equals_scipy_on_the_pooled_steps(tmp_path, masses):
    run = _write_run(tmp_path, masses)
    table = think_contrast_table(run)
    think = np.concatenate([masses[s][np.array(p) == "think"] for s, _, _, p in TRACES])
    answer = np.concatenate([masses[s][np.array(p) == "answer"] for s, _, _, p in TRACES])
    u = scipy.stats.mannwhitneyu(think, answer).statistic
    for row in table.itertuples():
        assert row.think_steps == think.size and row.answer_steps == answer.size
        assert row.mass_think == pytest.approx(think.mean(), rel=1e-5)
        assert row.mass_answer == pytest.approx(answer.mean(), rel=1e-5)
        assert row.auc == pytest.approx(u / (think.size * answer.size))
        assert row.ratio == pytest.approx(think.mean() / answer.mean(), rel=1e-5)
        assert row.auc_low <= row.auc <= row.auc_high


def test_analyze_reports_the_contrast_only_for_reasoning_traces(tmp_path, masses):
    from vpstudy.analysis import analyze

    result = analyze(_write_run(tmp_path / "a", masses))
    assert "think_contrast" in result["tables"]
    assert (tmp_path / "a" / "run" / "analysis" / "think_contrast.csv").is_file()

    run = _write_run(tmp_path / "b", masses, [t for t in TRACES if t[0] == "plain"])
    assert "think_contrast" not in analyze(run)["tables"]
    with pytest.raises(AnalysisError, match="no step is inside a <think> block"):
        think_contrast_table(run)
