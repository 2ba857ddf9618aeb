"""`vpstudy analyze` and the run-level tables: against pandas/scipy/numpy on the stored files,
against planted truth, against the organism audit (an independent implementation), and bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import N_V, planted_organism_run, snapshot
from scipy import stats as sps

import vpstudy
from vpstudy import stats
from vpstudy.analysis import analyze, default_layer
from vpstudy.annotations import region_tokens, step_annotations
from vpstudy.cli import main
from vpstudy.datasets import load_dataset
from vpstudy.organism.audit import audit_run
from vpstudy.report import findings, headline_lines
from vpstudy.stats import registry

FAST = stats.AnalysisSettings(n_boot=200, n_perm=200)


@pytest.fixture(scope="module")
def analyzed(organism_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("analyzed") / "run"
    shutil.copytree(organism_run, run_dir)
    return run_dir, analyze(run_dir, settings=FAST, progress=False)


def test_analyze_writes_stats_json_and_tidy_tables(analyzed):
    run_dir, result = analyzed
    folder = run_dir / "analysis"
    names = {"correlations", "never_activated", "step_dependence", "step_dependence_curve", "layer_similarity",
             "mass_contrast", "localization", "relevant_shift", "relevant_shift_curve"}  # fmt: skip
    # attribution_agreement needs `vpstudy attribute` first (tests/test_attribution.py)
    assert {p.stem for p in folder.glob("*.csv")} == names
    assert json.loads((folder / "stats.json").read_text()) == result
    assert result["analysis_layer"] == 3 and result["skipped"] == []  # the anchor depth of 6 layers
    corr = pd.read_csv(folder / "correlations.csv")
    assert len(corr) == 6 * 6 and set(corr["delta"]) == {"0.0005", "0.001", "0.0015", "0.002", "1/Nv", "2/Nv"}


def test_every_statistic_reads_back_what_analyze_wrote(analyzed):
    run_dir, result = analyzed
    folder = run_dir / "analysis"
    # every statistic the run supports (all but attribution_agreement, and think_contrast: the
    # organism does not reason in <think> blocks), in registry order
    unsupported = {"attribution_agreement", "think_contrast"}
    assert list(result["tables"]) == [s.name for s in stats.statistics() if s.name not in unsupported]
    for statistic in stats.statistics():
        if statistic.name not in result["tables"]:
            continue
        table = statistic.read(folder)
        expected = pd.DataFrame(result["tables"][statistic.name])
        if statistic.index is not None:
            expected = expected.set_index(statistic.index)
        expected = expected.astype(table.dtypes.to_dict())
        pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-12)
        assert all(isinstance(v, str) for c in statistic.labels if c in table for v in table[c]), statistic.name
    deltas = stats.get_statistic("never_activated").read(folder)["delta"]
    assert list(dict.fromkeys(deltas))[:2] == ["0.0005", "0.001"]  # labels, not the numbers 0.0005 and 0.001
    assert registry.get_statistic("correlations").read(tmp := folder.parent / "nowhere") is None and not tmp.exists()
    with pytest.raises(stats.AnalysisError, match=r"no statistic 'nope' \(known: correlations, never_activated"):
        stats.get_statistic("nope")


def test_a_registered_statistic_is_computed_written_and_reported(organism_run, tmp_path, monkeypatch):
    """Adding a statistic is its table function plus one registry entry: analyze computes and
    writes it, stats.json holds its table and headline, the report says its lines."""

    def peak_mass(context):  # the new table: largest visual mass per layer
        return context.run.steps.groupby("layer", as_index=False)["mass"].max()

    entry = registry.Statistic(
        "peak_mass", peak_mass, headline=lambda table, layer: registry.at_layer(table, layer, "peak_mass"),
        lines=lambda h: [f"peak mass {row['mass']:.4f} at layer {row['layer']}" for row in h.get("peak_mass", [])],
        findings=lambda h: [f"No step puts more than {row['mass']:.2f} of its attention on the image."
                            for row in h.get("peak_mass", [])],
    )  # fmt: skip
    absent = registry.Statistic("needs_what_this_run_lacks", peak_mass, when=lambda context: False)
    monkeypatch.setattr(registry, "STATISTICS", (*registry.STATISTICS, entry, absent))
    run_dir = tmp_path / "run"
    shutil.copytree(organism_run, run_dir)
    result = analyze(run_dir, settings=stats.AnalysisSettings(n_boot=20, n_perm=20), progress=False)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    peak = steps[steps["layer"] == 3]["mass"].max()
    written = pd.read_csv(run_dir / "analysis" / "peak_mass.csv")
    assert "needs_what_this_run_lacks" not in result["tables"]
    assert not (run_dir / "analysis" / "needs_what_this_run_lacks.csv").exists()
    np.testing.assert_allclose(written.set_index("layer")["mass"], steps.groupby("layer")["mass"].max())
    assert result["headline"]["peak_mass"] == [{"layer": 3, "mass": pytest.approx(peak)}]
    assert json.loads((run_dir / "analysis" / "stats.json").read_text())["tables"]["peak_mass"][3]["layer"] == 3
    assert f"peak mass {peak:.4f} at layer 3" in headline_lines(result)
    assert f"No step puts more than {peak:.2f} of its attention on the image." in findings(result)


def test_correlations_are_recomputable_from_steps_parquet_with_pandas(analyzed):
    run_dir, result = analyzed
    steps = pd.read_parquet(run_dir / "steps.parquet")  # pandas alone, no vpstudy
    for row in result["tables"]["correlations"]:
        d = steps[steps["layer"] == row["layer"]]
        column = d[f"active@{row['delta']}"]
        if column.nunique() == 1:
            assert row["pearson"] is None  # undefined, not 0
            continue
        assert row["pearson"] == pytest.approx(d["mass"].corr(column), abs=1e-9)
        assert row["spearman"] == pytest.approx(sps.spearmanr(d["mass"], column).statistic, abs=1e-9)
        assert row["pearson_low"] <= row["pearson"] <= row["pearson_high"]
        assert row["n_steps"] == len(d)


def test_never_activated_and_similarity_match_numpy_on_the_arrays(analyzed):
    run_dir, result = analyzed
    run = vpstudy.open_run(run_dir)
    max_scores = np.stack([np.asarray(run.arrays(i)["max_scores"]) for i in run.sample_ids])  # [B, L, N]
    table = pd.DataFrame(result["tables"]["never_activated"])
    for delta, value in (("0.002", 0.002), ("1/Nv", 1 / N_V), ("2/Nv", 2 / N_V)):
        got = table[(table["delta"] == delta)].sort_values("layer")["never_activated"].to_numpy()
        np.testing.assert_allclose(got, (max_scores <= value).mean(axis=(0, 2)), atol=1e-12)
    scores = [np.asarray(run.scores(i), dtype=np.float64) for i in run.sample_ids]
    per_sample = []
    for s in scores:  # the paper's procedure, written out
        unit = s / (np.linalg.norm(s, axis=-1, keepdims=True) + 1e-8)
        per_sample.append(np.mean([u @ u.T for u in unit], axis=0))
    similarity = pd.read_csv(run_dir / "analysis" / "layer_similarity.csv", index_col="layer").to_numpy()
    np.testing.assert_allclose(similarity, np.mean(per_sample, axis=0), atol=1e-6)


def test_step_dependence_matches_sets_built_by_hand(analyzed):
    run_dir, result = analyzed
    run = vpstudy.open_run(run_dir)
    k = round(0.1 * N_V)
    consecutive = []
    for i in run.sample_ids:
        s = np.asarray(run.scores(i), dtype=np.float32)[:, 2]
        sets = [set(np.argsort(-row, kind="stable")[:k]) for row in s]
        consecutive.append(np.mean([len(a & b) / len(a | b) for a, b in zip(sets, sets[1:], strict=False)]))
    row = next(r for r in result["tables"]["step_dependence"] if r["layer"] == 2)
    assert row["jaccard_consecutive"] == pytest.approx(np.mean(consecutive))


def test_annotated_statistics_agree_with_the_organism_audit(analyzed):
    """The generic annotations (boxes in image fractions) and the organism audit (grid cells)
    are separate implementations; on the same run they must give the same numbers."""
    run_dir, result = analyzed
    run = vpstudy.open_run(run_dir)
    audit = audit_run(run, load_dataset(run.manifest["dataset"]["path"], limit=len(run.samples)))
    loc = {r["layer"]: r for r in result["tables"]["localization"]}
    contrast = {r["layer"]: r for r in result["tables"]["mass_contrast"]}
    for row in audit["per_layer"]:
        layer = row["layer"]
        assert loc[layer]["localization"] == pytest.approx(row["localization"])
        assert loc[layer]["steps"] == row["localization_steps"] and loc[layer]["chance"] == pytest.approx(row["chance"])
        assert contrast[layer]["auc"] == pytest.approx(row["mass_auc"])
        assert contrast[layer]["ratio"] == pytest.approx(row["mass_ratio"])


def test_planted_localization_and_contrast_are_found(tmp_path):
    run, dataset, truth = planted_organism_run(tmp_path)
    annotations = step_annotations(run, dataset)
    loc = stats.localization_table(run, annotations, FAST).set_index("layer")
    assert loc.loc[1, "localization"] == pytest.approx(np.mean(truth["hits"]))
    assert loc.loc[1, "localization_low"] < np.mean(truth["hits"]) < loc.loc[1, "localization_high"]
    contrast = stats.mass_contrast_table(run, annotations, FAST).set_index("layer")
    read, text = np.array(truth["read"]), np.array(truth["text"])
    assert contrast.loc[1, "ratio"] == pytest.approx(read.mean() / text.mean(), rel=1e-3)
    assert contrast.loc[1, "auc_low"] > 0.5


def test_region_tokens_map_boxes_onto_the_grid():
    assert region_tokens([[0.0, 0.0, 0.25, 0.25]], (8, 8)) == (0, 1, 8, 9)
    assert region_tokens([[0.5, 0.75, 0.75, 1.0]], (8, 8)) == (52, 53, 60, 61)
    assert region_tokens([[0.0, 0.0, 0.5, 1.0]], (2, 3)) == (0, 3)  # centres at x = 1/6 only
    assert region_tokens([], (8, 8)) == ()


def test_annotations_stop_at_the_first_divergence(tmp_path):
    run, dataset, _ = planted_organism_run(tmp_path)
    first = run.sample_ids[0]
    reference = next(ex for ex in dataset if ex.id == first).extra["trace"].split()
    steps = pd.read_parquet(run.path / "steps.parquet")
    # make the model say something else at step 2 of the first sample
    part = next((run.path / "steps.parquet").glob("part-000000-*.parquet"))
    table = pd.read_parquet(part)
    table.loc[table["step"] == 2, "token_text"] = "zzz"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), part)
    annotated = [a for a in step_annotations(vpstudy.open_run(run.path), dataset) if a.sample_id == first]
    assert [a.step for a in annotated] == [0, 1, 2]
    others = [a for a in step_annotations(run, dataset) if a.sample_id == first]
    assert len(others) == len(reference) + 1  # on the path to the end, EOS step included
    assert len(steps) > 0


def test_default_layer_is_the_recorded_layer_at_anchor_depth(organism_run):
    assert default_layer(vpstudy.open_run(organism_run)) == 3  # round(17 / 36 · 6)


# -- bad input -----------------------------------------------------------------------------------


def _rewrite_steps(run_dir, change):
    for part in (run_dir / "steps.parquet").glob("part-*.parquet"):
        table = pd.read_parquet(part)
        pq.write_table(pa.Table.from_pandas(change(table), preserve_index=False), part)


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("empty run", [], r"the run holds no recorded samples"),
        ("nan mass", [], r"steps.parquet has NaN in 'mass' \(sample 'organism-0000', step 0, layer 0\)"),
        ("nan scores", [], r"score array of sample 'organism-0000' holds NaN"),
        ("layer not recorded", ["--layer", "9"], r"layer 9 was not recorded \(recorded layers: \[0, 1, 2, 3, 4, 5\]\)"),
        ("not a run", [], r"no such run directory"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_run_intact(case, args, message, organism_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(organism_run, run_dir)
    if case == "empty run":
        for folder in ("samples.parquet", "steps.parquet"):
            for part in (run_dir / folder).glob("*"):
                part.unlink()
    elif case == "nan mass":
        _rewrite_steps(run_dir, lambda t: t.assign(mass=t["mass"].mask((t["step"] == 0) & (t["layer"] == 0))))
    elif case == "nan scores":
        run = vpstudy.open_run(run_dir)
        key = run.path / "arrays" / vpstudy.runs.sample_key("organism-0000") / "scores.npy"
        scores = np.load(key)
        scores[1, 1, 3] = np.nan
        np.save(key, scores)
    elif case == "not a run":
        run_dir = tmp_path / "nowhere"
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["analyze", str(run_dir), "--n-boot", "20", "--n-perm", "20", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpstudy analyze: error: "), err
    assert re.search(message, err[0]), err[0]
    assert snapshot(tmp_path) == before


def test_a_delta_that_was_not_recorded_is_named(organism_run):
    run = vpstudy.open_run(organism_run)
    with pytest.raises(stats.AnalysisError, match=r"δ 0.003 was not recorded \(recorded: 0.0005, .*2/Nv\)"):
        stats.correlation_table(run, FAST, deltas=["0.003"])
    with pytest.raises(stats.AnalysisError, match=r"δ 'abc' is neither a number nor 'k/Nv'"):
        stats.never_activated_table(run, FAST, deltas=["abc"])


def test_analyze_cli_prints_the_headline(organism_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(organism_run, run_dir)
    assert main(["analyze", str(run_dir), "--n-boot", "50", "--n-perm", "50"]) == 0
    out = capsys.readouterr().out
    assert "analysis layer 3" in out and "Pearson r" in out and "localization at the analysis layer (3)" in out
    assert (run_dir / "analysis" / "stats.json").is_file()


def test_a_dataset_without_annotations_skips_those_statistics_with_a_note(organism_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(organism_run, run_dir)
    data = tmp_path / "plain" / "data.jsonl"
    data.parent.mkdir()
    source = vpstudy.open_run(run_dir).manifest["dataset"]["path"]
    records = [json.loads(line) for line in open(source)][:64]
    for r in records:
        r.pop("token_reads_image")
        r["image"] = str((Path(source).parent / r["image"]).resolve())
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = analyze(run_dir, data=data, settings=FAST, progress=False)
    assert "mass_contrast" not in result["tables"] and "localization" not in result["tables"]
    assert any("no trace annotations" in s for s in result["skipped"])
