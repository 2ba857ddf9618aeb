"""Store policies and bounded recording (vpstudy.storage, vpstudy.tracebuffer): each policy keeps
exactly what ``--store full`` keeps where it keeps anything, chunk boundaries change nothing, the
recorder's device buffers do not grow with the trace, commands that need p̄ a run lacks say so in
one line, and a ``kill -9`` mid-sample loses at most that sample."""

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
import torch
from PIL import Image

import vpstudy
from helpers import planted_organism_run, snapshot
from vpstudy.cli import main
from vpstudy.figures import fig_mass_over_steps, write_figures
from vpstudy.organism.audit import audit_run
from vpstudy.processing import format_prompt, prepare_batch
from vpstudy.runs import RunStoreError
from vpstudy.stats import MissingScoresError, localization_table, step_dependence_table
from vpstudy.stats.tables import AnalysisSettings
from vpstudy.storage import StorePolicy, StorePolicyError, analysis_layer, estimate
from vpstudy.testing import make_tiny_dataset

TIMING = ["batch_prefill_s", "batch_decode_s"]  # wall times: the only columns that differ between runs
RUNS = {"full": ["--store", "full", "--chunk-steps", "3"],
        "full-one-chunk": ["--store", "full", "--chunk-steps", "1000"],
        "analysis": ["--store", "analysis", "--chunk-steps", "3"],
        "analysis+0": ["--store", "analysis", "--score-layers", "0", "--chunk-steps", "2"],
        "scalars": ["--store", "scalars", "--chunk-steps", "3"]}  # fmt: skip


def _record(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["record", "--model", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "8",
                 "--batch-size", "2", "--limit", "4", "--no-progress", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dirs, tiny_data):
    """The same 4 examples of the tiny 2-layer Qwen2-VL recorded under every policy (batches of 2)."""
    root = tmp_path_factory.mktemp("store")
    for name, extra in RUNS.items():
        assert _record(tiny_dirs["qwen2_vl"], tiny_data, root / name, *extra) == 0
    return {name: vpstudy.open_run(root / name) for name in RUNS}


def test_each_policy_keeps_what_full_keeps_where_it_keeps_it(runs):
    full = runs["full"]
    assert full.store == {"policy": "full", "score_layers": [0, 1]} and analysis_layer([0, 1]) == 1
    assert runs["analysis"].store == {"policy": "analysis", "score_layers": [1]}
    assert runs["analysis+0"].store == {"policy": "analysis", "score_layers": [0, 1]}
    assert runs["scalars"].store == {"policy": "scalars", "score_layers": []}
    for name, run in runs.items():
        pd.testing.assert_frame_equal(run.steps, full.steps)  # every scalar at every layer, under every policy
        pd.testing.assert_frame_equal(run.samples.drop(columns=TIMING), full.samples.drop(columns=TIMING))
        for sample_id in full.sample_ids:
            np.testing.assert_array_equal(run.arrays(sample_id)["max_scores"], full.arrays(sample_id)["max_scores"])
            everything = full.scores(sample_id)
            if run.score_layers:
                kept = run.scores(sample_id)
                assert kept.dtype == np.float16 and kept.shape == (everything.shape[0], len(run.score_layers),
                                                                   everything.shape[2])  # fmt: skip
                positions = [full.score_layers.index(layer) for layer in run.score_layers]
                assert np.array_equal(kept, everything[:, positions]), (name, sample_id)
            else:
                assert "scores" not in run.arrays(sample_id)
    with pytest.raises(RunStoreError, match=r"keeps no per-step p̄ \(--store scalars\); record with --store "):
        runs["scalars"].scores(full.sample_ids[0])


def test_the_runs_p_bar_is_the_exact_recorders_rounded_to_float16(runs, tiny_dirs, tiny_data):
    """float16 leaves the device: the stored values are the float32 recorder's (checked against
    transformers' eager attention weights in test_recorder.py), rounded once."""
    full = runs["full"]
    from vpstudy.datasets import load_dataset

    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    examples = list(load_dataset(tiny_data, limit=2))  # the run's first batch
    spec = model.vpstudy_family
    prompts = [format_prompt(processor, spec, ex.question) for ex in examples]
    inputs = prepare_batch(processor, spec, model.config, prompts, [ex.image() for ex in examples])
    with vpstudy.record(model, store=StorePolicy("full", chunk_steps=5)) as rec, torch.inference_mode():
        model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
    for example, trace in zip(examples, rec.traces(), strict=True):
        assert trace.scores.dtype == np.float32
        assert np.array_equal(full.scores(example.id), trace.scores.astype(np.float16))


def test_chunk_boundaries_change_nothing(runs):
    """Chunks of 3 steps (several per trace, one cut mid-trace) against one chunk: identical bytes."""
    a, b = runs["full"], runs["full-one-chunk"]
    for sample_id in a.sample_ids:
        for name in ("scores", "max_scores"):
            key = vpstudy.runs.sample_key(sample_id)
            assert (a.path / "arrays" / key / f"{name}.npy").read_bytes() == (
                b.path / "arrays" / key / f"{name}.npy"
            ).read_bytes()
    pd.testing.assert_frame_equal(a.steps, b.steps)


def _ragged_batch(tiny_dirs):
    """The tiny Qwen2-VL, a batch of 3 and an EOS id that ends row 0 at step 4 and row 2 later or never,
    so the rows' traces end at different steps, some inside a chunk."""
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    spec = model.vpstudy_family
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(84, 84), (84, 112),
                                                                                           (60, 100)]]  # fmt: skip
    prompts = [format_prompt(processor, spec, q) for q in ("what is it", "count them", "where is the square")]
    inputs = prepare_batch(processor, spec, model.config, prompts, images)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    generated = plain[:, inputs["input_ids"].shape[1] :].tolist()
    eos = next(t for t in generated[0][4:] if t not in generated[0][:4] and t not in generated[1])
    return model, inputs, eos


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunks_streamed_to_a_sink_equal_one_chunk_kept_in_memory(tiny_dirs, chunk):
    model, inputs, eos = _ragged_batch(tiny_dirs)

    def run(store, sink=None):
        with vpstudy.record(model, eos_token_ids=[eos], store=store, sink=sink) as rec, torch.inference_mode():
            model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        return rec.traces()

    whole = run(StorePolicy("full", chunk_steps=1000))
    assert len({t.n_steps for t in whole}) > 1, "the rows should end at different steps"
    chunks = []
    streamed = run(StorePolicy("full", chunk_steps=chunk), chunks.append)
    assert len(chunks) == -(-max(t.n_steps for t in whole) // chunk)
    for b, (a, s) in enumerate(zip(whole, streamed, strict=True)):
        assert s.scores is None and s.n_steps == a.n_steps  # p̄ went to the sink, not into the trace
        for name in ("mass", "max_head_mass", "active", "tau_max_head_mass", "max_scores"):
            np.testing.assert_array_equal(getattr(s, name), getattr(a, name))
        rows = np.concatenate([c.scores[b, : c.valid[b], :, : a.n_visual] for c in chunks])
        np.testing.assert_array_equal(rows, a.scores)


def test_device_buffers_do_not_grow_with_the_trace(tiny_dirs):
    """What the recorder holds on the device is allocated when a generation begins and is the same
    for 6 and 30 steps (and is what vpstudy.storage.estimate says); with a sink no p̄ stays behind."""
    model, processor = vpstudy.load(tiny_dirs["qwen2_vl"])
    spec = model.vpstudy_family
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (84, 84, 3), dtype=np.uint8))
    inputs = prepare_batch(processor, spec, model.config, [format_prompt(processor, spec, "what")], [image])
    n_visual = int(spec.visual_mask(inputs["input_ids"], model.config).sum())
    sizes, steps = {}, {}
    for new in (6, 30):
        received: list = []
        store = StorePolicy("analysis", chunk_steps=4)
        with vpstudy.record(model, store=store, eos_token_ids=[], score_dtype=torch.float16,
                            sink=received.append) as rec, torch.inference_mode():  # fmt: skip
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sizes[new] = rec.buffer_bytes()
            (trace,) = rec.traces()
        steps[new] = sum(int(c.valid[0]) for c in received)
        assert trace.n_steps == new and trace.scores is None and steps[new] == new
    assert sizes[6] == sizes[30] == estimate(policy="analysis", layers=2, score_layers=1, n_visual=n_visual,
                                             steps=30, thresholds=6, temperatures=2, chunk_steps=4).device_buffers
    with vpstudy.record(model, store=StorePolicy("full", chunk_steps=4), score_dtype=torch.float16) as rec, \
            torch.inference_mode():  # fmt: skip
        model.generate(**inputs, max_new_tokens=6, do_sample=False)
        full_size = rec.buffer_bytes()
    assert full_size - sizes[6] == 4 * 1 * n_visual * 2  # one more layer of float16 p̄ in the chunk


def test_record_prints_its_size_estimate_and_it_is_exact_for_the_arrays(runs, tiny_dirs, tiny_data, tmp_path, capsys):
    assert main(["record", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(tiny_data), "--out",
                 str(tmp_path / "run"), "--max-new-tokens", "8", "--limit", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("store analysis"))
    assert "(2 layers recorded, p̄ per step at layers [1])" in line and "on disk per sample at 8 steps" in line
    full = runs["full"]
    sample = full.samples.iloc[0]
    est = estimate(policy="full", layers=2, score_layers=2, n_visual=int(sample.n_visual), steps=int(sample.steps),
                   thresholds=6, temperatures=2)  # fmt: skip
    folder = full.path / "arrays" / vpstudy.runs.sample_key(sample.sample_id)
    assert (folder / "scores.npy").stat().st_size == est.scores
    assert (folder / "max_scores.npy").stat().st_size == est.max_scores


def test_analyze_keeps_what_scalars_allow_and_says_what_needs_more(runs):
    from vpstudy.analysis import analyze

    result = analyze(runs["scalars"], settings=AnalysisSettings(n_boot=20, n_perm=20), progress=False)
    assert {"correlations", "never_activated"} <= set(result["tables"])
    assert not {"step_dependence", "layer_similarity", "relevant_shift"} & set(result["tables"])
    notes = [n for n in result["skipped"] if "--store" in n]
    assert len(notes) == 2, notes  # one line per reason: "at a layer", "at two or more layers"
    assert any("step dependence" in n and "no layer (--store scalars): record with --store full" in n for n in notes)

    result = analyze(runs["analysis"], settings=AnalysisSettings(n_boot=20, n_perm=20), progress=False)
    assert [r["layer"] for r in result["tables"]["step_dependence"]] == [1]
    assert "layer_similarity" not in result["tables"]
    (note,) = [n for n in result["skipped"] if "--store" in n]
    assert "layer similarity needs p̄ at 2 or more layers; this run kept p̄ at layers [1] (--store analysis): " \
           "record with --store full or --score-layers 0,1; skipped" in note  # fmt: skip
    both = analyze(runs["analysis+0"], settings=AnalysisSettings(n_boot=20, n_perm=20), progress=False)
    full = analyze(runs["full"], settings=AnalysisSettings(n_boot=20, n_perm=20), progress=False)
    assert both["tables"]["layer_similarity"] == full["tables"]["layer_similarity"]
    assert result["tables"]["step_dependence"] == [r for r in full["tables"]["step_dependence"] if r["layer"] == 1]


def test_tables_at_the_score_layers_equal_full_and_elsewhere_refuse(tmp_path):
    full, dataset, _ = planted_organism_run(tmp_path / "full")
    kept, _, _ = planted_organism_run(tmp_path / "kept", score_layers=[1, 2])
    from vpstudy.annotations import step_annotations

    settings = AnalysisSettings(n_boot=50)
    a = localization_table(kept, step_annotations(kept, dataset), settings)
    b = localization_table(full, step_annotations(full, dataset), settings)
    pd.testing.assert_frame_equal(a, b[b["layer"].isin([1, 2])].reset_index(drop=True))
    pd.testing.assert_frame_equal(step_dependence_table(kept, settings),
                                  step_dependence_table(full, settings).iloc[[1, 2]].reset_index(drop=True))
    with pytest.raises(MissingScoresError, match=r"activation overlays needs p̄ at layer 3; this run kept p̄ at "
                                                 r"layers \[1, 2\] \(--store analysis\): record with --store full or "
                                                 r"--score-layers 3$"):  # fmt: skip
        fig_mass_over_steps(kept, kept.sample_ids[0], np.zeros((8, 8, 3), np.uint8), layer=3)


def test_the_audit_works_under_analysis_and_says_what_it_left_out(tmp_path):
    full, dataset, _ = planted_organism_run(tmp_path / "full")
    kept, _, _ = planted_organism_run(tmp_path / "kept", score_layers=[1, 2])
    whole, part = audit_run(full, dataset), audit_run(kept, dataset)
    for a, b in zip(whole["per_layer"], part["per_layer"], strict=True):
        if a["layer"] in (1, 2):
            assert a == b
        else:
            assert b["localization"] is None and b["mass_auc"] == a["mass_auc"]
    assert part["best_layer"] == whole["best_layer"] == 1 and part["budget"] == whole["budget"]
    assert part["anchor_auto"]["coverage"].keys() == {"1"}  # candidates: the kept layers but the deepest
    (note,) = part["notes"]
    assert "localization and the referred share needs p̄ at layers [0, 3]" in note


def test_commands_that_need_more_refuse_in_one_line_and_write_nothing(runs, tmp_path, capsys):
    for name in ("analysis", "scalars"):
        run = runs[name]
        before = snapshot(run.path)
        capsys.readouterr()
        assert main(["fit-budget", str(run.path), "--layer", "auto", "--delta", "1/Nv", "--out",
                     str(tmp_path / f"{name}.json")]) == 2  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("vpstudy fit-budget: error: "), err
        assert "fit-budget --layer auto (the anchor criterion compares p̄ across layers) needs p̄ at 2 or more " \
               f"layers; this run kept p̄ at {'layers [1]' if name == 'analysis' else 'no layer'}" in err  # fmt: skip
        assert "record with --store full or --score-layers 0,1" in err
        assert not (tmp_path / f"{name}.json").exists() and snapshot(run.path) == before
        assert main(["fit-budget", str(run.path), "--layer", "1", "--delta", "1/Nv", "--out",
                     str(tmp_path / f"{name}-1.json")]) == 0  # fmt: skip  (a fixed layer reads scalars only)
    rules = [json.loads((tmp_path / f"{name}-1.json").read_text()) for name in ("scalars", "analysis")]
    for rule in rules:
        rule["fit"].pop("run")
    assert rules[0] == rules[1]
    assert main(["fit-budget", str(runs["analysis+0"].path), "--layer", "auto", "--delta", "1/Nv", "--out",
                 str(tmp_path / "auto.json")]) == 0  # fmt: skip


def test_figures_under_scalars_skip_what_needs_p_bar_with_one_line_each(runs, tmp_path):
    report = write_figures([runs["scalars"].path], tmp_path / "figs", bench_dir=None, progress=False)
    written = {p.stem for p in report.written}
    assert {"mass_vs_active", "never_activated", "budget_dynamics"} <= written
    assert not {"mass_over_steps", "layer_similarity", "relevant_shift"} & written
    for name in ("mass_over_steps", "layer_similarity", "relevant_shift"):
        (line,) = [s for s in report.skipped if s.split(" ")[0] == name or s.startswith(f"{name} of")]
        assert "(--store scalars): record with --store full" in line, line
    assert any("budget_dynamics drawn without top-p" in n for n in report.notes)
    report = write_figures([runs["analysis"].path], tmp_path / "figs-analysis", bench_dir=None, progress=False)
    assert {"mass_over_steps", "relevant_shift", "budget_dynamics"} <= {p.stem for p in report.written}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--store", "full", "--score-layers", "1"], r"--score-layers applies to --store analysis; --store full keeps"),
        (["--score-layers", "5"], r"--score-layers \[5\] out of range: the text model has 2 layers"),
        (["--layers", "0", "--score-layers", "1"], r"--score-layers \[1\]: not recorded \(recorded layers: \[0\]\)"),
        (["--store", "full"], r"existing run was recorded with different store \(stored \{\"policy\": \"analysis\""),
    ],
)
def test_bad_store_settings_are_one_line_and_leave_the_run_as_it_was(runs, tiny_dirs, tiny_data, extra, message,
                                                                     capsys):  # fmt: skip
    run = runs["analysis"].path
    before = snapshot(run)
    capsys.readouterr()
    assert _record(tiny_dirs["qwen2_vl"], tiny_data, run, *extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("vpstudy record: error: "), errors
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(run) == before
    with pytest.raises(StorePolicyError, match="--store 'everything': expected one of full, analysis, scalars"):
        StorePolicy("everything")


def test_kill_9_mid_sample_loses_at_most_that_sample(tmp_path, tiny_dirs):
    """Chunks of 2 steps of 48: a sample's p̄ is on disk in its hidden staged arrays long before it is
    committed; a kill leaves that invisible, a resume removes it and redoes the sample."""
    data = make_tiny_dataset(tmp_path / "data", n=10)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vpstudy.cli", "record", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data),
           "--out", str(out), "--max-new-tokens", "48", "--batch-size", "1", "--store", "full", "--chunk-steps", "2",
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, parts = time.monotonic() + 180, out / "samples.parquet"
    while time.monotonic() < deadline and (not parts.exists() or len(list(parts.glob("part-*"))) < 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = vpstudy.open_run(out)
    assert 3 <= len(run.samples) < 10, "the run should have been killed part-way"
    committed = {vpstudy.runs.sample_key(s) for s in run.sample_ids}
    assert {p.name for p in (out / "arrays").iterdir() if not p.name.startswith(".")} == committed
    for _, sample in run.samples.iterrows():
        assert run.scores(sample.sample_id).shape[0] == sample.steps
    finished = list(run.samples["sample_id"])
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    run = vpstudy.open_run(out)
    assert len(run.samples) == 10 and list(run.samples["sample_id"])[: len(finished)] == finished
    assert not [p for p in (out / "arrays").iterdir() if p.name.startswith(".")]  # the staged leftovers are gone
    for _, sample in run.samples.iterrows():
        assert run.scores(sample.sample_id).shape == (sample.steps, 2, sample.n_visual)
