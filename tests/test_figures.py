"""Figures from saved runs: every figure is written, absent inputs are skips, bad inputs are
one-line errors before anything is written, the statistics drawn come from ``RUN/analysis/``
when it is current (and are recomputed otherwise), and the overlay, region outline, label
spreading and top-p arithmetic are exact. The run is synthetic (random p̄ over the organism's
images), so no model is run and runs/demo is not needed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text

from vpstudy import stats
from vpstudy.analysis import analyze
from vpstudy.cli import main
from vpstudy.collect import sample_tables
from vpstudy.datasets import load_dataset
from vpstudy.figures import (
    STATISTIC_FIGURES,
    FigureInputError,
    activation_mask,
    activation_overlay,
    default_sample,
    fig_accuracy_vs_retention,
    fig_budget_dynamics,
    fig_layer_similarity,
    fig_mass_over_steps,
    fig_mass_vs_active,
    fig_never_activated,
    load_comparisons,
    run_image,
    sample_regions,
    spatial_grid,
    spread_labels,
    top_p_counts,
    write_figures,
)
from vpstudy.figures.overlays import grey, region_outline
from vpstudy.organism.shipped import write_eval_set
from vpstudy.recorder import SampleTrace
from vpstudy.rules import BudgetRule, Threshold, active_column
from vpstudy.runs import RunWriter, open_run

N_V, LAYERS = 64, [0, 1, 2, 3]
FIGURES = ("mass_over_steps", "mass_vs_active", "never_activated", "budget_dynamics", "layer_similarity")
FAST = stats.AnalysisSettings(n_boot=20, n_perm=20)
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
                "model_config_hash": "synthetic", "method": None,
                "thresholds": [t.label for t in THRESHOLDS]}  # fmt: skip
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
              "total_s": 0.5 * k, "roofline_decode_s": 0.2 * k}
             for k, n in enumerate([8192, 16384], start=1)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "latency", "device": "test GPU", "rows": rows}))
    return path


def _comparison_csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"method": ["dense", "visionpulse", "top-k"], "mean_kept_fraction": [1.0, 0.04, 0.05],
                  "accuracy": [0.9, 0.85, 0.7], "accuracy_low": [0.85, 0.8, float("nan")],
                  "accuracy_high": [0.95, 0.9, float("nan")],
                  "mean_length": [14.0, 15.5, 18.0]}).to_csv(path, index=False)  # fmt: skip
    return path


def test_every_figure_is_written_as_png_and_pdf_and_nothing_outside_out(root, tmp_path):
    bench = _latency_json(root / "bench" / "latency-gpu.json").parent
    (bench / "recording.json").write_text(json.dumps({"benchmark": "recording"}))  # another kind: ignored
    csv = _comparison_csv(root / "eval" / "comparison.csv")
    before = snapshot(root)
    out = tmp_path / "figs"
    report = write_figures([root / "run"], out, bench_dir=bench, comparisons=[csv], progress=False)
    # the one figure this run cannot have: attribution needs `vpstudy attribute` first
    assert report.skipped == ["attribution_agreement skipped: the run lacks what attribution_agreement needs"]
    names = {*FIGURES, "latency", "accuracy_vs_retention", "relevant_shift"}
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
    report = write_figures([root / "run", orphan], out, bench_dir=tmp_path / "no-bench",
                           comparisons=[tmp_path / "no.csv"], rule=tmp_path / "no-rule.json",
                           samples=["organism-0001", "nope"], progress=False)  # fmt: skip
    skipped = "\n".join(report.skipped)
    for absent in ("no-bench", "no.csv", "no-rule.json", "gone/data.jsonl", "'nope'"):
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
    with pytest.raises(FigureInputError, match=r"comparison\.csv: comparison table lacks column\(s\) mean_kept_fr"):
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
    image[0, 0] = (255, 0, 0)
    image[3, 5] = (10, 200, 30)
    drawn = activation_overlay(ax, image, scores, (1, 2, 2), 50)
    overlay = drawn.get_array()
    assert overlay.shape == (4, 6)
    np.testing.assert_array_equal(np.ma.getmaskarray(overlay), np.kron([[1, 0], [1, 0]], np.ones((2, 3))).astype(bool))
    np.testing.assert_allclose(overlay[:2, 3:], 1.0)
    np.testing.assert_allclose(overlay[2:, 3:], 2 / 3)
    # the image lies beneath, in grey (ITU-R 601 luminance), the map on top of it
    beneath, top = ax.get_images()
    assert top is drawn and beneath.get_cmap().name == "gray" and beneath.get_clim() == (0.0, 1.0)
    expected = np.zeros((4, 6))
    expected[0, 0], expected[3, 5] = 0.299, (0.299 * 10 + 0.587 * 200 + 0.114 * 30) / 255
    np.testing.assert_allclose(beneath.get_array(), expected)
    np.testing.assert_allclose(grey(image), expected)
    # kept tokens are semi-transparent; tokens not kept are fully transparent, so the image shows
    assert drawn.get_cmap().name.startswith("autumn_r") and drawn.get_alpha() == 0.6
    assert drawn.get_cmap().get_bad()[3] == 0.0
    colour = activation_overlay(Figure().add_subplot(), image, scores, (2, 2), 50, in_grey=False)
    np.testing.assert_array_equal(colour.axes.get_images()[0].get_array(), image)


def test_region_outline_draws_only_the_border_of_the_union():
    ax = Figure().add_subplot()
    # tokens 0, 1 and 5 of a 4 x 4 grid on a 40 x 40 image (10 px per token): an L of three cells
    region_outline(ax, (0, 1, 5), (4, 4), (40, 40))
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = {tuple(map(tuple, np.round(seg + 0.5, 6))) for seg in lines.get_segments()}
    expected = {((0, 0), (10, 0)), ((10, 0), (20, 0)), ((0, 10), (10, 10)), ((10, 20), (20, 20)),
                ((0, 0), (0, 10)), ((20, 0), (20, 10)), ((10, 10), (10, 20)), ((20, 10), (20, 20))}  # fmt: skip
    assert segments == expected  # 8 border edges; the two inner edges are not drawn


def test_spread_labels_separates_crowded_labels_and_clears_the_points():
    rng = np.random.default_rng(0)
    fx = np.concatenate([np.full(7, 0.1) + rng.uniform(0, 0.01, 7), [0.5, 0.9]])
    fy = np.concatenate([0.2 + rng.uniform(0, 0.05, 7), [0.5, 0.9]])
    widths = np.full(len(fx), 0.03)
    lx, ly = spread_labels(fx, fy, widths, height=0.05)
    for i in range(len(fx)):
        for j in range(i + 1, len(fx)):  # no two label boxes overlap
            assert abs(lx[i] - lx[j]) >= 0.03 - 1e-9 or abs(ly[i] - ly[j]) >= 0.05 - 1e-9, (i, j)
        for k in range(len(fx)):  # no label covers a point
            assert abs(lx[i] - fx[k]) >= 0.015 + 0.02 - 1e-9 or abs(ly[i] - fy[k]) >= 0.025 + 0.02 - 1e-9, (i, k)
    assert ((lx > 0) & (lx < 1) & (ly > 0) & (ly < 1)).all()
    lone_x, lone_y = spread_labels(np.array([0.5]), np.array([0.5]), np.array([0.03]))
    assert lone_y[0] == 0.5 and lone_x[0] > 0.5  # a label with room stays beside its point


def test_spatial_grid_only_accepts_a_single_image_layout():
    assert spatial_grid([8, 8], 64) == (8, 8) and spatial_grid([1, 4, 16], 64) == (4, 16)
    assert spatial_grid([64], 64) is None and spatial_grid([2, 4, 8], 64) is None and spatial_grid([8, 8], 60) is None


def _regenerate_module():
    path = Path(__file__).parents[1] / "paper_figures" / "regenerate.py"
    spec = importlib.util.spec_from_file_location("regenerate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerate_script_skips_an_absent_default_run_and_refuses_a_named_one(tmp_path, capsys, monkeypatch):
    module = _regenerate_module()
    monkeypatch.setattr(module, "DEFAULT_RUN", tmp_path / "no-default-run")
    monkeypatch.setattr(module, "DEFAULT_RULE", tmp_path / "no-rule.json")
    monkeypatch.setattr(module, "DEFAULT_COMPARISON", tmp_path / "no-comparison.csv")
    common = ["--out", str(tmp_path / "figs"), "--bench", str(tmp_path / "b"), "--no-progress"]
    assert module.main(common) == 0
    printed = capsys.readouterr().out
    assert "skipped: run figures skipped: default run" in printed and "no-default-run" in printed
    assert "0 files" in printed
    assert module.main([str(tmp_path / "no-run"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'no-run'}: no such run directory"]
    assert not (tmp_path / "figs").exists() or not any((tmp_path / "figs").iterdir())


# -- the figures read vpstudy analyze's tables when present ---------------------------------------


@pytest.fixture()
def analyzed(root, tmp_path):
    """A copy of the synthetic run with ``analysis/`` written by ``vpstudy analyze``."""
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    analyze(run_dir, settings=FAST, progress=False)
    return run_dir


def _legend_texts(figure: Figure) -> list[str]:
    return [t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def _plant(run_dir: Path) -> dict[str, float]:
    """Overwrite three analysis tables with values no computation on this run gives."""
    folder = run_dir / "analysis"
    corr = pd.read_csv(folder / "correlations.csv", dtype={"delta": str})
    at = (corr["layer"] == 2) & (corr["delta"] == "1/Nv")
    corr.loc[at, ["pearson", "pearson_low", "pearson_high"]] = [0.123, 0.101, 0.147]
    corr.to_csv(folder / "correlations.csv", index=False)
    never = pd.read_csv(folder / "never_activated.csv", dtype={"delta": str})
    at = (never["layer"] == 2) & (never["delta"] == "1/Nv")
    never.loc[at, ["never_activated", "never_activated_low", "never_activated_high"]] = [0.4321, 0.4, 0.46]
    never.to_csv(folder / "never_activated.csv", index=False)
    similarity = pd.read_csv(folder / "layer_similarity.csv", index_col="layer")
    similarity.loc[:, :] = 0.777
    similarity.to_csv(folder / "layer_similarity.csv")
    return {"r": 0.123, "never": 0.4321, "similarity": 0.777}


def _never_bar(figure: Figure, delta: str) -> float:
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    return float(ax.patches[labels.index(f"δ={delta}")].get_height())


def _similarity(figure: Figure) -> np.ndarray:
    return np.asarray(next(i for i in figure.axes[0].get_images() if isinstance(i, AxesImage)).get_array())


def test_figures_draw_the_planted_analysis_tables_not_a_recomputation(analyzed):
    planted = _plant(analyzed)
    run = open_run(analyzed)
    legend = _legend_texts(fig_mass_vs_active(run, 2))
    assert "δ=1/Nv (r=0.12 [0.10, 0.15])" in legend, legend
    assert _never_bar(fig_never_activated(run, 2), "1/Nv") == pytest.approx(planted["never"])
    np.testing.assert_allclose(_similarity(fig_layer_similarity(run)), planted["similarity"])
    # the values a recomputation gives are different: the figures above did not recompute
    steps = run.steps[run.steps["layer"] == 2]
    assert abs(steps["mass"].corr(steps[active_column("1/Nv")]) - planted["r"]) > 0.05
    never = stats.never_activated_table(run, FAST, deltas=["1/Nv"])
    assert abs(float(never.loc[never["layer"] == 2, "never_activated"].iloc[0]) - planted["never"]) > 0.05
    assert not np.allclose(stats.layer_similarity(run)[1], planted["similarity"])


def test_without_a_current_analysis_the_figures_recompute_their_tables(analyzed):
    planted = _plant(analyzed)
    run = open_run(analyzed)
    steps = run.steps[run.steps["layer"] == 2]
    r = steps["mass"].corr(steps[active_column("1/Nv")])
    never = stats.never_activated_table(run, stats.AnalysisSettings(), deltas=["1/Nv"])
    share = float(never.loc[never["layer"] == 2, "never_activated"].iloc[0])
    similarity = stats.layer_similarity(run)[1]

    def check(figures_run, note: str) -> None:
        assert f"δ=1/Nv (r={r:.2f})" in _legend_texts(fig_mass_vs_active(figures_run, 2)), note
        assert _never_bar(fig_never_activated(figures_run, 2), "1/Nv") == pytest.approx(share), note
        np.testing.assert_allclose(_similarity(fig_layer_similarity(figures_run)), similarity, atol=1e-6, err_msg=note)

    # asked not to read it
    assert f"δ=1/Nv (r={r:.2f})" in _legend_texts(fig_mass_vs_active(run, 2, from_analysis=False))
    assert _never_bar(fig_never_activated(run, 2, from_analysis=False), "1/Nv") == pytest.approx(share)
    np.testing.assert_allclose(_similarity(fig_layer_similarity(run, from_analysis=False)), similarity, atol=1e-6)
    # an analysis older than the run (it counted another number of samples) is not read, and said so
    stats_path = analyzed / "analysis" / "stats.json"
    result = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**result, "samples": result["samples"] + 1}))
    check(open_run(analyzed), "stale analysis")
    report = write_figures([analyzed], analyzed.parent / "figs", bench_dir=None, progress=False)
    assert any("older than the run" in n and "samples 7 vs 6 now" in n for n in report.notes), report.notes
    # no analysis at all
    shutil.rmtree(analyzed / "analysis")
    check(open_run(analyzed), "no analysis")
    assert planted  # the planted values were there all along


def test_a_corrupt_analysis_table_is_a_one_line_error(analyzed):
    (analyzed / "analysis" / "layer_similarity.csv").write_text("nonsense\n1,2\n")
    with pytest.raises(stats.AnalysisError, match=r"layer_similarity\.csv: no 'layer' column; rerun vpstudy analyze"):
        fig_layer_similarity(open_run(analyzed))
    (analyzed / "analysis" / "correlations.csv").write_text("layer,delta\n2,1/Nv\n")
    with pytest.raises(FigureInputError, match=r"correlations\.csv: lacks column\(s\) pearson, pearson_low"):
        fig_mass_vs_active(open_run(analyzed), 2)


def test_every_statistic_figure_is_drawn_by_the_figures_package():
    named = [s.figure for s in stats.statistics() if s.figure is not None]
    assert named == ["mass_vs_active", "never_activated", "layer_similarity", "relevant_shift", "attribution_agreement"]
    assert set(named) == set(STATISTIC_FIGURES)


def test_a_registered_statistic_with_a_figure_is_drawn_by_write_figures(root, tmp_path, monkeypatch):
    from vpstudy.stats import registry
    from vpstudy.figures import write as figures_write

    def mean_mass(context):
        return context.run.steps.groupby("layer", as_index=False)["mass"].mean()

    def draw(run, layer):
        figure = Figure()
        figure.add_subplot().bar(*mean_mass(registry.StatContext(run, layer)).to_numpy().T)
        return figure

    extra = registry.Statistic("mean_mass", mean_mass, figure="mean_mass")
    monkeypatch.setattr(registry, "STATISTICS", (*registry.STATISTICS, extra))
    monkeypatch.setitem(figures_write.STATISTIC_FIGURES, "mean_mass", draw)
    report = write_figures([root / "run"], tmp_path / "figs", bench_dir=None, progress=False)
    assert tmp_path / "figs" / "mean_mass.png" in report.written


# -- the activation figure decodes without the code ------------------------------------------------


def test_activation_figure_has_the_image_a_colour_bar_and_a_legend_for_the_outlines(root):
    run = open_run(root / "run")
    sample = default_sample(run)
    regions = sample_regions(run, sample)
    dataset = load_dataset(run.manifest["dataset"]["path"])
    example = next(e for e in dataset if e.id == sample)
    first = min(regions)  # the first annotated step: the dataset's first token with boxes
    assert first == next(t for t, boxes in enumerate(example.extra["token_boxes"]) if boxes)
    image = run_image(run, sample)
    figure = fig_mass_over_steps(run, sample, image, layer=2, regions=regions)
    titles = [ax.get_title() for ax in figure.axes]
    assert any(t.startswith("input image (64×64 px") for t in titles), titles
    assert sum(t.startswith(f"step {first}:") for t in titles) == 2  # the region's step is drawn, at both levels
    colour_bars = [ax for ax in figure.axes if "normalised" in ax.get_ylabel()]
    assert len(colour_bars) == 1
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert any("kept visual token" in t for t in legend) and any("not kept" in t for t in legend)
    assert any("region the predicted token refers to" in t for t in legend)
    outlined = [ax for ax in figure.axes
                if ax.get_label() != "<colorbar>" and any(isinstance(c, LineCollection) for c in ax.collections)]
    assert len(outlined) == 2 and all(ax.get_title().startswith(f"step {first}:") for ax in outlined)
    input_panel = next(ax for ax in figure.axes if ax.get_title().startswith("input image"))
    np.testing.assert_array_equal(input_panel.get_images()[0].get_array(), np.asarray(image))


def test_budget_rules_stay_visible_where_they_equal_top_k(root):
    run = open_run(root / "run")
    sample = default_sample(run)
    rules = [BudgetRule.paper(0.1, 0.01, 0.05), BudgetRule.paper(0.4, 0.05, 0.10)]
    ax = fig_budget_dynamics(run, sample, 2, rules=rules).axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    top_k = next(v for k, v in lines.items() if k.startswith("fixed top-K"))
    drawn = [v for k, v in lines.items() if k.startswith("mass budget")]
    assert len(drawn) == 2
    markers = [line.get_marker() for line in drawn]
    assert len(set(markers)) == 2 and "None" not in markers and "" not in markers  # each rule has its own marker
    assert drawn[0].get_markersize() > drawn[1].get_markersize()  # the later one drawn smaller, on top
    assert all(line.get_zorder() > top_k.get_zorder() for line in drawn)
    assert top_k.get_linewidth() > 3 * drawn[0].get_linewidth()  # the band is wider than the lines on it


def test_accuracy_labels_are_short_numbers_named_in_a_side_table(tmp_path):
    csv = tmp_path / "eval" / "comparison.csv"
    csv.parent.mkdir()
    methods = ["dense", "visionpulse-5", "topk-5", "static_topk-5", "random-like-visionpulse-5", "fastv-5",
               "pyramiddrop-5", "fastv50+visionpulse-5"]  # fmt: skip
    kept = [1.0, 0.046, 0.047, 0.047, 0.046, 0.062, 0.062, 0.045]
    accuracy = [0.98, 0.23, 0.23, 0.26, 0.25, 0.27, 0.26, 0.27]
    pd.DataFrame({"method": methods, "mean_kept_fraction": kept, "accuracy": accuracy,
                  "accuracy_low": [a - 0.06 for a in accuracy], "accuracy_high": [a + 0.07 for a in accuracy],
                  "mean_length": [12.9, 12.1, 12.1, 12.2, 12.4, 12.4, 12.4, 12.1]}
                 ).to_csv(csv, index=False)  # fmt: skip
    figure = fig_accuracy_vs_retention(load_comparisons([csv]))
    figure.draw_without_rendering()
    renderer = figure._get_renderer()
    for ax in figure.axes[:2]:
        labels = [t for t in ax.texts if re.fullmatch(r"\d+", t.get_text())]
        assert sorted(int(t.get_text()) for t in labels) == list(range(1, len(methods) + 1))
        boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the number, not its leader line
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    table = next(t.get_text() for t in figure.axes[2].texts)
    for number, method in enumerate(methods, start=1):
        assert re.search(rf"^ *{number}  {re.escape(method)} ", table, flags=re.MULTILINE), method


# -- bad input through the command line: one line, exit 2, nothing written --------------------------


def _figures_cli(capsys, *args: str) -> list[str]:
    capsys.readouterr()
    assert main(["figures", *args]) == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_run_directory_that_does_not_exist_is_an_error(root, tmp_path, capsys):
    out = tmp_path / "figs"
    err = _figures_cli(capsys, str(root / "run"), str(tmp_path / "no-run"), "--out", str(out))
    assert err == [f"vpstudy figures: error: {tmp_path / 'no-run'}: no such run directory"]
    assert not out.exists()  # checked before anything was drawn or written


def test_an_out_path_that_is_a_file_is_an_error(root, tmp_path, capsys):
    out = tmp_path / "figs.png"
    out.write_bytes(b"not a directory")
    err = _figures_cli(capsys, str(root / "run"), "--out", str(out))
    assert err == [f"vpstudy figures: error: {out}: exists and is not a directory "
                   "(the figures need an output directory)"]  # fmt: skip
    assert out.read_bytes() == b"not a directory"
    under = out / "sub"  # a directory under a file cannot be created: an OSError, still one line
    err = _figures_cli(capsys, str(root / "run"), "--out", str(under))
    assert len(err) == 1 and err[0].startswith(f"vpstudy figures: error: {under}: cannot write figures there ("), err


@pytest.mark.parametrize(("content", "message"), [
    ("method,accuracy\nx,0.5\n", r"comparison table lacks column\(s\) mean_kept_fraction"),
    ("method,mean_kept_fraction,accuracy,accuracy_low,accuracy_high,mean_length\nx,lots,0.5,0.4,0.6,3\n",
     r"non-numeric value in a numeric column"),
    ("", r"cannot be read as CSV"),
])  # fmt: skip
def test_a_malformed_comparison_table_is_an_error(root, tmp_path, capsys, content, message):
    csv = tmp_path / "eval" / "comparison.csv"
    csv.parent.mkdir()
    csv.write_text(content)
    out = tmp_path / "figs"
    err = _figures_cli(capsys, str(root / "run"), "--out", str(out), "--comparison", str(csv))
    assert len(err) == 1 and err[0].startswith(f"vpstudy figures: error: {csv}: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_a_malformed_latency_result_is_an_error(root, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "latency.json").write_text(json.dumps({"kind": "latency", "rows": [{"method": "dense"}]}))
    err = _figures_cli(capsys, str(root / "run"), "--out", str(tmp_path / "figs"), "--bench", str(bench))
    assert len(err) == 1 and re.search(r"latency\.json: latency rows need .*\(missing: visual_tokens", err[0]), err
    assert not (tmp_path / "figs").exists()


def test_a_read_only_output_directory_is_a_one_line_error(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "figs"
    out.mkdir()

    def refuse(*args, **kwargs):  # what a read-only directory answers (root is not refused by chmod)
        raise PermissionError(13, "Permission denied", str(out / "probe"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    err = _figures_cli(capsys, str(root / "run"), "--out", str(out))
    assert err == [f"vpstudy figures: error: {out}: cannot write figures there (Permission denied)"]
    assert list(out.iterdir()) == []
    monkeypatch.undo()

    def full(self, path, **kwargs):  # the directory is writable, but a file cannot be written
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", full)
    err = [line for line in _figures_cli(capsys, str(root / "run"), "--out", str(out)) if "error" in line]  # no bar
    assert len(err) == 1 and re.fullmatch(rf"vpstudy figures: error: {re.escape(str(out))}/\S+\.png: cannot be "
                                          r"written \(No space left on device\)", err[0]), err  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory; the test above fakes it")
def test_a_read_only_output_directory_refuses_for_real(root, tmp_path, capsys):
    out = tmp_path / "figs"
    out.mkdir()
    out.chmod(0o555)
    try:
        err = _figures_cli(capsys, str(root / "run"), "--out", str(out))
    finally:
        out.chmod(0o755)
    assert err == [f"vpstudy figures: error: {out}: cannot write figures there (Permission denied)"]


def test_budget_dynamics_are_drawn_at_the_fitted_rules_layer(root, tmp_path):
    """A rule fitted at a layer other than the analysis layer (an anchor chosen from data) is
    drawn on the trace of its own layer, not left out."""
    from vpstudy.storage import analysis_layer

    layer = max(LAYERS)
    assert layer != analysis_layer(LAYERS)
    rule = BudgetRule(signal="mass", b_min=0.01, b_max=0.3, slope=0.2, layer=layer,
                      model={"config_hash": "synthetic", "path": "synthetic"})  # fmt: skip
    rule.save(tmp_path / "rule.json")
    report = write_figures([root / "run"], tmp_path / "figs", bench_dir=None, rule=tmp_path / "rule.json",
                           progress=False)  # fmt: skip
    assert not [s for s in report.skipped if "budget" in s], report.skipped
    assert tmp_path / "figs" / "budget_dynamics.png" in report.written
