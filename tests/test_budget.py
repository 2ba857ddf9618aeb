"""Budget rules: the paper's rule on hand-set signals, fitting on a planted run, provenance checks."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot

import vpstudy
from vpstudy.rules import BudgetRule, BudgetRuleError
from vpstudy.stats.fit import fit_budget, prediction_stats
from vpstudy.cli import main
from vpstudy.runs import RunWriter
from vpstudy.stats import AnalysisError


def test_paper_rule_keeps_floor_of_the_clamped_share():
    rule = BudgetRule.paper(0.1, 0.01, 0.05)
    assert rule.signal == "max_head_mass@tau=0.1" and rule.tau == 0.1 and rule.model is None
    # a planted mass of 0.03 inside [0.01, 0.05] keeps floor(0.03 · N_v)
    assert rule.keep_count(0.03, 100) == 3
    assert rule.keep_count(0.03, 1000) == 30
    assert rule.keep_count(0.29, 100) == 5  # clamped to b_max
    assert rule.keep_count(0.0, 1000) == 10  # clamped to b_min
    assert rule.keep_count(0.03, 64) == 1  # floor(1.92)
    assert rule.keep_count(0.03, 10) == 1  # never below one token
    assert replace(rule, rounding="ceil").keep_count(0.03, 64) == 2
    # vectorised over steps with per-step N_v
    counts = rule.keep_count(np.array([0.02, 0.04, 0.5]), np.array([100, 200, 300]))
    assert counts.tolist() == [2, 8, 15]


def test_a_rule_float_error_does_not_lose_a_token():
    rule = BudgetRule(signal="mass", b_min=0.01, b_max=0.5)
    assert 0.29 * 100 < 29  # 28.999999999999996 in binary floating point
    assert rule.keep_count(0.29, 100) == 29


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"signal": "entropy"}, "signal 'entropy' is not"),
        ({"signal": "mass@tau=0.1"}, "head-mean mass is recorded at τ = 1 only"),
        ({"b_min": 0.2, "b_max": 0.1}, "clamps must satisfy"),
        ({"rounding": "nearest"}, "rounding must be"),
    ],
)
def test_malformed_rules_are_refused(fields, message):
    with pytest.raises(BudgetRuleError, match=re.escape(message)):
        BudgetRule(**{"signal": "mass", "b_min": 0.01, "b_max": 0.05} | fields)


def _planted_run(root, slope=0.2, intercept=0.02, n_samples=40, n_v=100, seed=0):
    """A run whose active share at δ=0.001 is exactly intercept + slope · mass (rounded to tokens)."""
    rng = np.random.default_rng(seed)
    manifest = {"kind": "record", "layers": [0, 3], "model": {"family": "llava", "path": "/models/a"},
                "model_config_hash": "abc123", "thresholds": ["0.001"]}  # fmt: skip
    with RunWriter(root, manifest) as writer:
        for i in range(n_samples):
            steps = int(rng.integers(5, 15))
            mass = rng.uniform(0.05, 0.9, size=(steps, 2))
            active = np.round((intercept + slope * mass) * n_v).astype(np.int64)
            table = pd.DataFrame({
                "sample_id": f"s{i}", "step": np.repeat(np.arange(steps), 2), "layer": np.tile([0, 3], steps),
                "token_text": "x", "mass": mass.reshape(-1), "max_head_mass": mass.reshape(-1),
                "active@0.001": active.reshape(-1), "max_head_mass@tau=0.1": (mass / 4).reshape(-1),
            })  # fmt: skip
            sample = {"sample_id": f"s{i}", "dataset": "d", "steps": steps, "n_visual": n_v, "grid_shape": [10, 10]}
            scores = np.full((steps, 2, n_v), 0.001, dtype=np.float16)
            writer.write_sample(sample, table, {"scores": scores, "max_scores": scores.max(0).astype(np.float32)})
    return vpstudy.open_run(root)


def test_fit_recovers_a_planted_linear_rule_and_predicts_held_out_counts(tmp_path):
    run = _planted_run(tmp_path / "run")
    rule = fit_budget(run, layer=3, delta="0.001")
    assert rule.slope == pytest.approx(0.2, abs=0.01) and rule.intercept == pytest.approx(0.02, abs=0.005)
    assert rule.layer == 3 and rule.model["config_hash"] == "abc123" and rule.signal == "mass"
    fit = rule.fit
    assert fit["train_samples"] + fit["heldout_samples"] == 40 and fit["heldout_samples"] == 12
    assert fit["heldout"]["r2"] > 0.97 and fit["heldout"]["mae_tokens"] < 1.0
    # both paper rules are scored on the same held-out steps, and they are far worse here
    assert set(fit["heldout_paper"]) == {"paper τ=0.1 [0.01, 0.05]", "paper τ=0.4 [0.05, 0.1]"}
    paper = fit["heldout_paper"]["paper τ=0.1 [0.01, 0.05]"]
    assert paper["r2"] < fit["heldout"]["r2"] and paper["steps"] == fit["heldout"]["steps"]
    assert fit["heldout_paper"]["paper τ=0.4 [0.05, 0.1]"] is None  # its signal was not recorded
    # clamps: 1st / 99th percentile of the training active shares unless imposed
    held = run.steps[(run.steps.layer == 3)]
    assert rule.b_min >= (held["active@0.001"] / 100).min() - 1e-9
    imposed = fit_budget(run, layer=3, delta="0.001", b_min=0.01, b_max=0.05)
    assert (imposed.b_min, imposed.b_max) == (0.01, 0.05) and imposed.fit["clamps_from"] == "arguments"


def test_prediction_stats_against_numpy():
    rule = BudgetRule(signal="mass", b_min=0.01, b_max=1.0, slope=0.5)
    signal = np.array([0.1, 0.4, 0.8, 0.2])
    active = np.array([4, 25, 35, 12])
    stats = prediction_stats(rule, signal, active, np.array([100, 100, 100, 100]))
    kept = np.array([5, 20, 40, 10])
    assert stats["mae_tokens"] == pytest.approx(np.abs(active - kept).mean())
    assert stats["pearson"] == pytest.approx(np.corrcoef(kept, active)[0, 1])
    assert stats["r2"] == pytest.approx(1 - ((active - kept) ** 2).sum() / ((active - active.mean()) ** 2).sum())
    assert stats["covered"] == 0.5 and stats["mean_keep_ratio"] == pytest.approx(kept.mean() / 100)


def test_rule_round_trips_and_refuses_another_model_or_layer(tmp_path):
    rule = fit_budget(_planted_run(tmp_path / "run"), layer=3, delta="0.001")
    path = rule.save(tmp_path / "rule.json")
    loaded = BudgetRule.load(path)
    assert loaded == rule and loaded.fit == json.loads(path.read_text())["fit"]
    loaded.check(config_hash="abc123", layer=3)
    with pytest.raises(BudgetRuleError, match=r"fitted on model /models/a \(config abc123\), not this one \(config zzz\)"):
        loaded.check(config_hash="zzz", layer=3)
    with pytest.raises(BudgetRuleError, match="fitted at layer 3, not layer 17"):
        loaded.check(config_hash="abc123", layer=17)
    loaded.check(config_hash="zzz", layer=17, allow_mismatch=True)
    BudgetRule.paper().check(config_hash="anything", layer=5)  # the paper's rule applies to any model


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such budget rule file"), ("{not json", "cannot be read as JSON"),
     ('{"a": 1}', "not a vpstudy budget rule"),
     ('{"format": "vpstudy-budget-rule/1", "signal": "mass", "b_min": 0.5, "b_max": 0.1}', "clamps must satisfy")],
)  # fmt: skip
def test_loading_a_bad_rule_names_the_file(tmp_path, content, message):
    path = tmp_path / "rule.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BudgetRuleError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        BudgetRule.load(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"layer": 5, "delta": "0.001"}, AnalysisError, r"layer 5 was not recorded \(recorded layers: \[0, 3\]\)"),
     ({"layer": 3, "delta": "2/Nv"}, AnalysisError, r"δ 2/Nv was not recorded \(recorded: 0.001\)"),
     ({"layer": 3, "delta": "0.001", "signal": "max_head_mass@tau=0.4"}, BudgetRuleError, "was not recorded")],
)  # fmt: skip
def test_fitting_on_what_was_not_recorded_is_refused(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_budget(_planted_run(tmp_path / "run", n_samples=4), **kwargs)


def test_fit_budget_cli_writes_a_rule_and_never_overwrites(tmp_path, capsys):
    _planted_run(tmp_path / "run")
    out = tmp_path / "rule.json"
    assert main(["fit-budget", str(tmp_path / "run"), "--layer", "3", "--delta", "0.001", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out (12 samples)" in printed and BudgetRule.load(out).layer == 3
    before = snapshot(tmp_path)
    assert main(["fit-budget", str(tmp_path / "run"), "--layer", "0", "--delta", "0.001", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpstudy fit-budget: error: ") and "pass --overwrite" in err[0]
    assert snapshot(tmp_path) == before
    assert main(["fit-budget", str(tmp_path / "run"), "--layer", "9", "--delta", "0.001", "--out", str(tmp_path / "b.json")]) == 2  # fmt: skip
    assert "layer 9 was not recorded" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def _shifting_run(root, n_samples=8, steps=10, n_v=40):
    """Four layers; layer 2's top-4 set is exactly where layers 3 attends (the planted best anchor),
    layers 0 and 1 attend elsewhere, and layer 3's own set moves every step."""
    manifest = {"kind": "record", "layers": [0, 1, 2, 3], "model": {"family": "llava", "path": "/m"},
                "model_config_hash": "h", "thresholds": ["0.001"]}  # fmt: skip
    rng = np.random.default_rng(1)
    with RunWriter(root, manifest) as writer:
        for i in range(n_samples):
            scores = np.full((steps, 4, n_v), 1e-3, dtype=np.float32)
            for t in range(steps):
                target = (4 * t + np.arange(4)) % n_v
                scores[t, 3, target] = 0.2
                scores[t, 2, target] = 0.2
                scores[t, 1, (target + 20) % n_v] = 0.2
                scores[t, 0, rng.choice(n_v, 4, replace=False)] = 0.2
            mass = scores.sum(-1)
            table = pd.DataFrame({
                "sample_id": f"s{i}", "step": np.repeat(np.arange(steps), 4), "layer": np.tile([0, 1, 2, 3], steps),
                "token_text": "x", "mass": mass.reshape(-1), "max_head_mass": mass.reshape(-1),
                "active@0.001": (scores > 0.001).sum(-1).reshape(-1),
            })  # fmt: skip
            sample = {"sample_id": f"s{i}", "dataset": "d", "steps": steps, "n_visual": n_v, "grid_shape": [5, 8]}
            writer.write_sample(sample, table, {"scores": scores.astype(np.float16), "max_scores": scores.max(0)})
    return vpstudy.open_run(root)


def test_anchor_auto_chooses_the_layer_that_covers_the_deeper_ones(tmp_path):
    from vpstudy.stats.fit import anchor_coverage, choose_anchor

    run = _shifting_run(tmp_path / "run")
    coverage = anchor_coverage(run, run.sample_ids, 0.1)  # K = 4
    # independent recomputation for layer 1: its top-4 holds none of layer 2's or 3's peaks
    s = run.scores(run.sample_ids[0]).astype(np.float64)[1:]
    top = np.argsort(-s[:, 1], axis=-1, kind="stable")[:, :4]
    share = [np.take_along_axis(s[:, l], top, -1).sum(-1) / s[:, l].sum(-1) for l in (2, 3)]
    assert coverage[2] > 0.9 > coverage[1] and coverage[0] < coverage[2]
    assert choose_anchor(coverage) == 2
    rule = fit_budget(run, layer="auto", delta="0.001", anchor_budget=0.1, localization={2: 0.9})
    assert rule.layer == 2 and rule.fit["anchor_choice"]["chosen"] == 2
    assert rule.fit["anchor_choice"]["localization"] == {"2": 0.9}
    assert np.mean(share) < 0.5


def test_the_fit_uses_decode_steps_only_and_refuses_a_pruned_run(tmp_path):
    run = _planted_run(tmp_path / "run")
    rule = fit_budget(run, layer=3, delta="0.001")
    decode = run.steps[(run.steps.layer == 3) & (run.steps.step >= 1)]
    assert rule.fit["train_steps"] + rule.fit["heldout"]["steps"] == len(decode)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["method"] = {"name": "topk-5", "methods": []}
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BudgetRuleError, match="recorded under topk-5; fit a budget rule on a dense recording"):
        fit_budget(vpstudy.open_run(tmp_path / "run"), layer=3, delta="0.001")
