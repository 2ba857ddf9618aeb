"""Figures from saved runs: every figure is written, absent inputs are skips, the overlay and
top-p arithmetic are exact. The run is synthetic (random p̄ over the organism's images), so no
model is run and runs/demo is not needed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot
from matplotlib.figure import Figure

from vpstudy.collect import sample_tables
from vpstudy.datasets import load_dataset
from vpstudy.figures import (
    FigureInputError,
    activation_mask,
    activation_overlay,
    default_sample,
    load_comparisons,
    spatial_grid,
    top_p_counts,
    write_figures,
)
from vpstudy.organism.shipped import write_eval_set
from vpstudy.recorder import SampleTrace
from vpstudy.rules import Threshold
from vpstudy.runs import RunWriter, open_run

N_V, LAYERS = 64, [0, 1, 2, 3]
FIGURES = ("mass_over_steps", "mass_vs_active", "never_activated", "budget_dynamics", "layer_similarity")
THRESHOLDS = [Threshold(0.0), Threshold(0.001), Threshold(0.002), Threshold(1, per_visual_token=True)]


class _Words:
    """The two tokenizer calls sample_tables makes, over a fixed word list."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(w for w in self.convert_ids_to_tokens(ids) if w != "</s>")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``root/data/data.jsonl`` (6 organism examples) and ``root/run``: each example's reference
    trace as the generated text, with random p̄ (mass 0.05..0.95 per step) at 4 layers."""
    root = tmp_path_factory.mktemp("figures")
    dataset = load_dataset(write_eval_set(root / "data", n=6, seed=3))
    words = sorted({w for ex in dataset for w in ex.extra["trace"].split()} | {"</s>"})
    tokenizer = _Words(words)
    manifest = {"kind": "record", "layers": LAYERS, "dataset": {"path": str(dataset.path), "name": dataset.name},
                "model_config_hash": "synthetic", "method": None, "thresholds": [t.label for t in THRESHOLDS]}  # fmt: skip
    writer = RunWriter(root / "run", manifest)
    rng = np.random.default_rng(0)
    for example in dataset:
        trace = example.extra["trace"].split() + ["</s>"]
        steps = len(trace)
        share = rng.dirichlet(np.full(N_V, 0.3), size=(steps, len(LAYERS)))
        scores = (share * rng.uniform(0.05, 0.95, size=(steps, len(LAYERS), 1))).astype(np.float32)
        deltas = np.array([t.resolve(N_V) for t in THRESHOLDS])
        record = SampleTrace(
            layers=LAYERS, thresholds=THRESHOLDS, visual_positions=np.arange(N_V), mass=scores.sum(-1),
            max_head_mass=scores.sum(-1), active=(scores[..., None] > deltas).sum(-2), max_scores=scores.max(0),
            scores=scores, temperatures=[0.1, 0.4], tau_max_head_mass=rng.uniform(0, 0.2, (steps, len(LAYERS), 2)),
        )  # fmt: skip
        ids = [words.index(w) for w in trace]
        writer.write_sample(*sample_tables(example, dataset.name, record, ids, tokenizer, [8, 8]))
    return root


def _latency_json(path: Path) -> Path:
    rows = [{"visual_tokens": n, "method": "dense", "prefill_s": 0.1 * k, "decode_s": 1.0 * k, "total_s": 1.1 * k}
            for k, n in enumerate([8192, 16384], start=1)]  # fmt: skip
    rows += [{"visual_tokens": n, "method": "visionpulse", "prefill_s": 0.1 * k, "decode_s": 0.4 * k,
              "total_s": 0.5 * k, "roofline_decode_s": 0.2 * k} for k, n in enumerate([8192, 16384], start=1)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "latency", "device": "test GPU", "rows": rows}))
    return path


def _comparison_csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"method": ["dense", "visionpulse", "top-k"], "mean_kept_fraction": [1.0, 0.04, 0.05],
                  "accuracy": [0.9, 0.85, 0.7], "accuracy_low": [0.85, 0.8, float("nan")],
                  "accuracy_high": [0.95, 0.9, float("nan")], "mean_length": [14.0, 15.5, 18.0]}).to_csv(path, index=False)  # fmt: skip
    return path


def test_every_figure_is_written_as_png_and_pdf_and_nothing_outside_out(root, tmp_path):
    bench = _latency_json(root / "bench" / "latency-gpu.json").parent
    (bench / "recording.json").write_text(json.dumps({"benchmark": "recording"}))  # another kind: ignored
    csv = _comparison_csv(root / "eval" / "comparison.csv")
    before = snapshot(root)
    out = tmp_path / "figs"
    report = write_figures([root / "run"], out, bench_dir=bench, comparisons=[csv], progress=False)
    assert report.skipped == []
    names = {*FIGURES, "latency", "accuracy_vs_retention"}
    assert sorted(report.written) == sorted(out / f"{n}.{ext}" for n in names for ext in ("png", "pdf"))
    for path in report.written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path
        assert path.stat().st_size > 1000, path
    assert sorted(out.iterdir()) == sorted(report.written)
    assert snapshot(root) == before  # the run, dataset and inputs are untouched


def test_absent_inputs_are_skips_not_errors(root, tmp_path):
    orphan = tmp_path / "orphan"
    shutil.copytree(root / "run", orphan)
    manifest = json.loads((orphan / "manifest.json").read_text())
    manifest["dataset"]["path"] = str(tmp_path / "gone" / "data.jsonl")
    (orphan / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "figs"
    report = write_figures([root / "run", orphan, tmp_path / "no-run"], out, bench_dir=tmp_path / "no-bench",
                           comparisons=[tmp_path / "no.csv"], rule=tmp_path / "no-rule.json",
                           samples=["organism-0001", "nope"], progress=False)  # fmt: skip
    skipped = "\n".join(report.skipped)
    for absent in ("no-run", "no-bench", "no.csv", "no-rule.json", "gone/data.jsonl", "'nope'"):
        assert absent in skipped, absent
    assert "accuracy_vs_retention skipped" in skipped
    assert not any("mass_over_steps" in p.name and p.name.startswith("orphan") for p in report.written)
    # several runs: names are prefixed by the run directory; explicit samples suffix the name
    assert out / "run-mass_over_steps-organism-0001.png" in report.written
    assert out / "orphan-budget_dynamics-organism-0001.pdf" in report.written
    assert out / "orphan-layer_similarity.png" in report.written


def test_no_input_at_all_writes_nothing_but_reports_each_skip(tmp_path):
    report = write_figures([], tmp_path / "figs", bench_dir=None, progress=False)
    assert report.written == [] and len(report.skipped) == 3


def test_malformed_comparison_table_is_a_one_line_error(tmp_path):
    bad = tmp_path / "comparison.csv"
    bad.write_text("method,accuracy\nx,0.5\n")
    with pytest.raises(FigureInputError, match=r"comparison\.csv: comparison table lacks column\(s\) mean_kept_fraction"):
        load_comparisons([bad])


def test_default_sample_is_the_first_correct_long_one(root):
    run = open_run(root / "run")
    chosen = run.samples.set_index("sample_id").loc[default_sample(run)]
    assert chosen["correct"] and chosen["steps"] >= 12


def test_top_p_counts_by_hand_and_against_a_brute_force_oracle():
    scores = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_p_counts(scores, 0.8).tolist() == [2, 4, 1, 1]  # 0.5+0.3 reaches 0.8 exactly
    assert top_p_counts(scores, 0.5).tolist() == [1, 2, 1, 1]
    assert top_p_counts(scores, 1.0).tolist() == [4, 4, 1, 1]
    rng = np.random.default_rng(1)
    random = rng.dirichlet(np.full(50, 0.2), size=40).astype(np.float16) * rng.uniform(0, 1, (40, 1))
    for p in (0.3, 0.9, 0.99):
        oracle = []
        for row in random.astype(np.float64):
            top = np.sort(row)[::-1]
            oracle.append(next((k for k in range(1, 51) if top[:k].sum() >= p * row.sum() - 1e-12), 50))
        assert top_p_counts(random, p).tolist() == oracle
    with pytest.raises(ValueError, match="top-p share"):
        top_p_counts(scores, 0.0)


def test_overlay_masks_exactly_the_tokens_at_or_below_the_percentile():
    scores = np.array([0.1, 0.4, 0.2, 0.3])  # grid [[0.1, 0.4], [0.2, 0.3]] -> normalised [[0, 1], [1/3, 2/3]]
    assert activation_mask(scores, (2, 2), 50).mask.tolist() == [[True, False], [True, False]]
    assert activation_mask(scores, (2, 2), 90).mask.tolist() == [[True, False], [True, True]]
    np.testing.assert_allclose(activation_mask(scores, (2, 2), 0).data, [[0, 1], [1 / 3, 2 / 3]])
    # a token exactly at the percentile is masked too: normalised [0, .25, .5, .75, 1], median 0.5
    assert activation_mask(np.arange(5.0), (1, 5), 50).mask.tolist() == [[True, True, True, False, False]]

    ax = Figure().add_subplot()
    image = np.zeros((4, 6, 3), dtype=np.uint8)  # H=4, W=6: each token covers 2 x 3 pixels
    drawn = activation_overlay(ax, image, scores, (1, 2, 2), 50)
    overlay = drawn.get_array()
    assert overlay.shape == (4, 6)
    np.testing.assert_array_equal(np.ma.getmaskarray(overlay), np.kron([[1, 0], [1, 0]], np.ones((2, 3))).astype(bool))
    np.testing.assert_allclose(overlay[:2, 3:], 1.0)
    np.testing.assert_allclose(overlay[2:, 3:], 2 / 3)
    assert drawn.get_cmap().name.startswith("autumn_r") and drawn.get_alpha() == 0.6
    assert tuple(drawn.get_cmap().get_bad()) == (0.0, 0.0, 0.0, 1.0)  # masked tokens are black


def test_spatial_grid_only_accepts_a_single_image_layout():
    assert spatial_grid([8, 8], 64) == (8, 8) and spatial_grid([1, 4, 16], 64) == (4, 16)
    assert spatial_grid([64], 64) is None and spatial_grid([2, 4, 8], 64) is None and spatial_grid([8, 8], 60) is None


def test_regenerate_script_reports_a_missing_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("regenerate", Path(__file__).parents[1] / "paper_figures" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "no-run"), "--out", str(tmp_path / "figs"), "--bench", str(tmp_path / "b"),
                        "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "skipped: run" in printed and "no-run" in printed and "0 files" in printed
