"""`vpstudy record` end to end: run store contents, resume, kill -9, and bad input that loses nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot

import vpstudy
from vpstudy.rules import BudgetRule
from vpstudy.cli import main
from vpstudy.testing import make_tiny_dataset


def _record(model: Path, data: Path, out: Path, *extra: str, max_new_tokens: str = "6") -> int:
    return main(["record", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", max_new_tokens, "--batch-size", "2", *extra])  # fmt: skip


@pytest.fixture()
def recorded(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    assert _record(tiny_dirs["qwen2_vl"], tiny_data, out, "--limit", "4") == 0
    assert f"{out}: 4 samples, 48 step-layer rows" in capsys.readouterr().out  # the summary line
    return out


def test_record_writes_the_run_store(recorded):
    run = vpstudy.open_run(recorded)
    assert run.manifest["schema_version"] == 1 and run.manifest["model"]["family"] == "qwen2_vl"
    assert run.manifest["layers"] == [0, 1] and len(run.manifest["model_config_hash"]) == 16
    assert list(run.samples["sample_id"]) == [f"tiny-{i:04d}" for i in range(4)]
    steps = pd.read_parquet(recorded / "steps.parquet")  # pandas alone reads the store
    assert len(steps) == len(run.steps) == int(run.samples["steps"].sum()) * 2
    # the default store policy (analysis): p̄ per step at the analysis layer (1 of 0, 1) only
    assert run.manifest["store"] == {"policy": "analysis", "score_layers": [1]} and run.score_layers == [1]
    for _, sample in run.samples.iterrows():
        scores = run.scores(sample.sample_id)
        assert scores.shape == (sample.steps, 1, sample.n_visual) and scores.dtype == np.float16
        rows = run.steps[(run.steps.sample_id == sample.sample_id) & (run.steps.layer == 1)].sort_values("step")
        np.testing.assert_allclose(rows["mass"].to_numpy(), scores.astype(np.float32).sum(-1).reshape(-1), atol=2e-3)
        max_scores = run.arrays(sample.sample_id)["max_scores"]  # every recorded layer
        assert max_scores.shape == (2, sample.n_visual)
        np.testing.assert_allclose(max_scores[1:], scores.astype(np.float32).max(0), atol=1e-3)
        assert int(np.prod(sample.grid_shape)) == sample.n_visual
    assert {"active@0.0005", "active@2/Nv", "max_head_mass", "token_text"} <= set(steps.columns)


def test_rerun_resumes_without_duplicates(recorded, tiny_dirs, tiny_data):
    before = vpstudy.open_run(recorded).steps
    assert _record(tiny_dirs["qwen2_vl"], tiny_data, recorded) == 0  # no limit: records the other 2
    run = vpstudy.open_run(recorded)
    assert len(run.samples) == 6 and run.samples["sample_id"].is_unique
    pd.testing.assert_frame_equal(run.steps.iloc[: len(before)].reset_index(drop=True), before.reset_index(drop=True))


def test_kill_9_loses_at_most_the_sample_in_flight(tmp_path, tiny_dirs):
    data = make_tiny_dataset(tmp_path / "data", n=12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vpstudy.cli", "record", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data),
           "--out", str(out), "--max-new-tokens", "48", "--batch-size", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    parts = out / "samples.parquet"
    while time.monotonic() < deadline and (not parts.exists() or len(list(parts.glob("part-*"))) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = vpstudy.open_run(out)
    assert 3 <= len(run.samples) < 12, "the run should have been killed part-way"
    assert run.samples["sample_id"].is_unique
    assert set(run.steps["sample_id"]) == set(run.samples["sample_id"])
    for _, sample in run.samples.iterrows():
        assert run.scores(sample.sample_id).shape[0] == sample.steps
    finished = list(run.samples["sample_id"])
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    run = vpstudy.open_run(out)
    assert len(run.samples) == 12 and run.samples["sample_id"].is_unique
    assert list(run.samples["sample_id"])[: len(finished)] == finished


def _bad_image_data(tmp_path: Path, kind: str) -> Path:
    data = make_tiny_dataset(tmp_path / kind, n=3)
    lines = data.read_text().splitlines()
    record = {**json.loads(lines[1]), "id": f"{kind}-1"}  # a new sample, so it is not skipped as done
    if kind == "missing":
        record["image"] = "images/gone.png"
    else:
        (data.parent / "images" / "broken.png").write_bytes(b"not a png")
        record["image"] = "images/broken.png"
    lines[1] = json.dumps(record)
    data.write_text("\n".join(lines) + "\n")
    return data


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing image", r"data.jsonl:line 2: image 'images/gone.png' not found"),
        ("unreadable image", r"data.jsonl:line 2: image 'images/broken.png' cannot be read as an image"),
        ("placeholder in question",
         r"data.jsonl:line 2: the prompt holds 2 image placeholders '<\|image_pad\|>' for its one image \(the question"),
        ("layers out of range", r"layers \[7\] out of range: the text model has 2 layers"),
        ("other settings", r"existing run was recorded with different generation"),
        ("other schema", r"manifest.json: schema version 99, this vpstudy writes 1; use a new --out directory"),
        ("unsupported family", r"model_type 'bert' is not a supported family"),
        ("another dataset", r"run: this run was recorded from dataset .*/data.jsonl \(6 records, sha256 "
                            r"[0-9a-f]{12}\), not .*/other/data.jsonl \(3 records, sha256 [0-9a-f]{12}\); pass"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_run_intact(case, message, recorded, tmp_path, tiny_dirs, tiny_data,
                                                         capsys):  # fmt: skip
    model, data, extra, max_new_tokens = tiny_dirs["qwen2_vl"], tiny_data, [], "6"
    if case in ("missing image", "unreadable image", "placeholder in question"):
        # a run of the bad dataset's good first example, then a rerun that reaches the bad second one
        if case == "placeholder in question":
            data = make_tiny_dataset(tmp_path / "placeholder", n=2)
            lines = data.read_text().splitlines()
            lines[1] = json.dumps({**json.loads(lines[1]), "question": "what is <|image_pad|> here"})
            data.write_text("\n".join(lines) + "\n")
        else:
            data = _bad_image_data(tmp_path, case.split()[0])
        recorded = tmp_path / "bad-data-run"
        assert _record(model, data, recorded, "--limit", "1") == 0
    if case == "layers out of range":
        extra = ["--layers", "0,7"]
    elif case == "other settings":
        max_new_tokens = "9"
    elif case == "other schema":
        manifest = json.loads((recorded / "manifest.json").read_text())
        (recorded / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    elif case == "another dataset":  # other images and answers under the same ids
        data = make_tiny_dataset(tmp_path / "other", n=3, seed=5)
    elif case == "unsupported family":
        model = tmp_path / "bert"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    before = snapshot(recorded)
    capsys.readouterr()
    assert _record(model, data, recorded, *extra, max_new_tokens=max_new_tokens) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("vpstudy record: error: "), errors
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(recorded) == before


def test_demo_records_analyzes_fits_draws_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"  # on organism v1 (64 visual tokens, 6 layers): the pipeline, not the findings
    argv = ["demo", "--organism", "v1", "--out", str(out), "--samples", "12", "--n-boot", "100", "--n-perm", "100"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "12 samples" in printed and f"report: {out / 'report.md'}" in printed
    run = vpstudy.open_run(out / "run")
    assert len(run.samples) == 12 and (out / "run" / "analysis" / "stats.json").is_file()
    rule = BudgetRule.load(out / "budget_rule.json")
    choice = rule.fit["anchor_choice"]
    assert rule.layer == choice["chosen"] and rule.fit["delta"] == "1/Nv" and rule.fit["run"] == str(out / "run")
    best = max(choice["coverage"].values())
    assert choice["chosen"] == min(int(a) for a, v in choice["coverage"].items() if v == best)
    report = (out / "report.md").read_text()
    for name in ("mass_over_steps", "mass_vs_active", "never_activated", "budget_dynamics", "layer_similarity",
                 "accuracy_vs_retention", "relevant_shift", "attribution_agreement"):  # fmt: skip
        assert (out / "figures" / f"{name}.png").is_file() and (out / "figures" / f"{name}.pdf").is_file()
        assert f"![{name}](figures/{name}.png)" in report
    assert "latency skipped" in report  # its input (GPU benchmark results) comes with the GPU issue
    # every registered method ran at 5% and 10% on the same 12 samples, anchored at the rule's layer
    table = pd.read_csv(out / "compare" / "comparison.csv")
    assert table["method"].iloc[0] == "dense" and (table["samples"] == 12).all()
    from vpstudy.pruning.registry import METHODS, comparison_entries

    expected = {e.label for e in comparison_entries(6, fitted_rule=True)}
    assert expected <= set(table["method"]) and {e.method.split("+")[-1] for e in comparison_entries(6)} >= set(METHODS)
    assert "## Pruning on the same samples" in report and "| visionpulse-5 |" in report
    # the ablation section and its table
    ablation = pd.read_csv(out / "ablation" / "ablation.csv")
    assert list(ablation["method"]) == ["dense", "visionpulse-5", "visionpulse-10", "visionpulse-fitted",
                                        "topk-fitted-mean", "random-fitted-mean", "static_topk-fitted-mean",
                                        "fastv-fitted-mean"]  # fmt: skip
    assert "## The paper's budget ablation" in report and "At equal mean budget" in report
    # the report's correlation is recomputable from steps.parquet with pandas alone
    steps = pd.read_parquet(out / "run" / "steps.parquet")
    layer = json.loads((out / "run" / "analysis" / "stats.json").read_text())["analysis_layer"]
    d = steps[steps["layer"] == layer]
    assert f"δ=1/Nv: Pearson r {d['mass'].corr(d['active@1/Nv']):.3f} [" in report
    assert f"mean visual mass {steps['mass'].mean():.3f}" in printed  # the summary line (all layers)
