"""`vpstudy evaluate`: pruning plans from the command line, the harness's run + eval.json on the
organism (checked against the run's own tables with pandas), and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot

import vpstudy
from vpstudy.rules import BudgetRule
from vpstudy.cli import main
from vpstudy.organism.shipped import eval_set_path, organism_dir
from vpstudy.pruning import FastV, PruningError, TopK, VisionPulse
from vpstudy.pruning.plan import build_plan, parse_settings

MODEL, DATA = str(organism_dir("llava")), str(eval_set_path())


def test_plans_are_built_from_names_and_typed_settings():
    plan = build_plan("topk", parse_settings(["ratio=0.1", "anchor=3"]))
    assert plan.methods == [TopK(ratio=0.1, anchor=3)] and plan.name == "topk"
    both = build_plan("fastv+visionpulse", parse_settings(["fastv.layer=2", "visionpulse.tau=0.4", "visionpulse.b_max=0.1"]))
    assert both.methods == [FastV(layer=2), VisionPulse(tau=0.4, b_max=0.1)]
    assert build_plan("dense") is None
    rule = BudgetRule(signal="mass", b_min=0.01, b_max=0.2, slope=0.3, layer=2, model={"config_hash": "x"})
    assert build_plan("visionpulse", rule=rule).methods[0].rule == rule
    assert build_plan("pyramiddrop", {"layers": "1,2"}).methods[0].layers == (1, 2)
    assert both.description()["methods"][0] == {"method": "fastv", "layer": 2, "ratio": 0.5}


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("fastvv", [], "unknown pruning method 'fastvv' (known: dense, visionpulse"),
        ("topk", ["k=3"], "topk: unknown setting(s) k (known: anchor, ratio)"),
        ("topk", ["ratio=lots"], "topk: setting ratio='lots' is not a valid float"),
        ("topk", ["ratio"], "setting 'ratio' is not key=value"),
        ("topk", ["ratio=1.5"], "topk: ratio must be in (0, 1], got 1.5"),
        ("fastv+visionpulse", ["ratio=0.3"], "setting(s) ratio name no method of fastv+visionpulse"),
        ("dense", ["ratio=0.3"], "dense takes no settings"),
    ],
)
def test_bad_plans_are_one_line_errors(name, settings, message):
    with pytest.raises(PruningError, match=re.escape(message)):
        build_plan(name, parse_settings(settings))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    common = ["--model", MODEL, "--data", DATA, "--limit", "12", "--batch-size", "12", "--max-new-tokens", "48"]
    assert main(["evaluate", *common, "--method", "dense", "--out", str(root / "dense")]) == 0
    assert main(["evaluate", *common, "--method", "visionpulse", "--out", str(root / "pulse"),
                 "--dense", str(root / "dense")]) == 0  # fmt: skip
    assert main(["evaluate", *common, "--method", "topk", "--set", "ratio=1.0", "--out", str(root / "all"),
                 "--dense", str(root / "dense")]) == 0  # fmt: skip
    return root


def test_eval_json_is_recomputable_from_the_run(evaluated):
    result = json.loads((evaluated / "pulse" / "eval.json").read_text())
    run = vpstudy.open_run(evaluated / "pulse")
    samples = pd.read_parquet(evaluated / "pulse" / "samples.parquet")
    steps = pd.read_parquet(evaluated / "pulse" / "steps.parquet")
    assert result["samples"] == 12 and result["accuracy"] == pytest.approx(samples["correct"].mean())
    assert result["mean_length"] == pytest.approx(samples["steps"].mean())
    deepest = steps[(steps["layer"] == 5) & (steps["step"] >= 1)].merge(samples[["sample_id", "n_visual"]])
    assert result["kept_fraction"]["mean"] == pytest.approx((deepest["kept"] / deepest["n_visual"]).mean())
    assert result["method"]["name"] == "visionpulse" and run.manifest["method"]["methods"][0]["tau"] == 0.1
    # the paper's ≤5% rule: 1..3 of the organism's 64 visual tokens at layers >= the anchor (3 of 6), all below
    decode = steps[steps["step"] >= 1]
    assert decode[decode["layer"] < 3]["kept"].eq(64).all()
    assert decode[decode["layer"] >= 3]["kept"].between(1, 3).all()
    assert steps[steps["step"] == 0]["kept"].eq(64).all()  # the prefill stays dense
    # the kept sets in the arrays agree with the counts
    for sample_id in run.sample_ids[:4]:
        bits = np.unpackbits(np.asarray(run.arrays(sample_id)["kept_bits"]), axis=-1, bitorder="little")[..., :64]
        counts = steps[(steps["sample_id"] == sample_id) & (steps["layer"] == 3)]["kept"].to_numpy()
        np.testing.assert_array_equal(bits[:, 0].sum(-1), counts)
    dense = pd.read_parquet(evaluated / "dense" / "samples.parquet").set_index("sample_id")
    mine = samples.set_index("sample_id")
    assert result["paired_samples"] == 12
    assert result["delta_vs_dense"] == pytest.approx(mine["correct"].mean() - dense.loc[mine.index, "correct"].mean())
    assert result["delta_vs_dense_ci95"][0] <= result["delta_vs_dense"] <= result["delta_vs_dense_ci95"][1]


def test_keeping_every_token_reproduces_the_dense_run(evaluated):
    result = json.loads((evaluated / "all" / "eval.json").read_text())
    assert result["agreement"] == 1.0 and result["delta_vs_dense"] == 0.0 and result["kept_fraction"]["mean"] == 1.0
    dense = pd.read_parquet(evaluated / "dense" / "samples.parquet").set_index("sample_id")
    mine = pd.read_parquet(evaluated / "all" / "samples.parquet").set_index("sample_id")
    assert (mine["generated_text"] == dense.loc[mine.index, "generated_text"]).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "topk", "--set", "anchor=7"], r"topk: anchor layer 7 out of range: the text model has 6 layers"),
        (["--method", "topk", "--set", "ratio=0"], r"topk: ratio must be in \(0, 1\], got 0.0"),
        (["--method", "nope"], r"unknown pruning method 'nope'"),
        (["--method", "visionpulse", "--rule", "RULE", "--set", "anchor=4"], r"fitted at layer 3, not layer 4"),
        (["--method", "visionpulse", "--rule", "FOREIGN"], r"was fitted on model /elsewhere \(config other\), not this one"),
        (["--method", "topk", "--scorer", "bleu"], r"unknown scorer 'bleu'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys):
    rule = BudgetRule(signal="mass", b_min=0.01, b_max=0.2, slope=0.2, layer=3,
                      model={"config_hash": vpstudy.loading.config_hash(vpstudy.load(MODEL)[0].config), "path": MODEL})  # fmt: skip
    rule.save(tmp_path / "rule.json")
    BudgetRule(signal="mass", b_min=0.01, b_max=0.2, layer=2, model={"config_hash": "other", "path": "/elsewhere"}).save(
        tmp_path / "foreign.json")
    extra = [str(tmp_path / "rule.json") if e == "RULE" else str(tmp_path / "foreign.json") if e == "FOREIGN" else e for e in extra]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--model", MODEL, "--data", DATA, "--limit", "2", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpstudy evaluate: error: "), err
    assert re.search(message, err[0]), err[0]
    assert snapshot(tmp_path) == before
