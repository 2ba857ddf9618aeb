"""User mistakes through the command line: each is one line on stderr and exit status 2 (130 for
Ctrl-C), written before anything is changed, and nothing the user already had is lost."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import snapshot
from PIL import Image

import vpstudy
from vpstudy.cli import main
from vpstudy.loading import looks_local
from vpstudy.rules import BudgetRule
from vpstudy.testing import make_tiny, make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
ORGANISM = REPO / "data" / "organism-llava"
TIMING = ["batch", "batch_prefill_s", "batch_decode_s", "batch_decode_steps"]  # wall times differ between runs


def cli(*argv: str) -> int:
    """``vpstudy ARGV``'s exit status (argparse's usage errors exit through SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return int(stop.code)


def record(model: Path, data: Path, out: Path, *extra: str) -> int:
    return cli("record", "--model", model, "--data", data, "--out", out, "--max-new-tokens", "4",
               "--batch-size", "1", "--no-progress", *extra)  # fmt: skip


def one_line(capsys: pytest.CaptureFixture[str], command: str, kind: str = "error") -> str:
    """The only stderr line, which must be ``vpstudy <command>: <kind>...`` (besides the size
    estimate ``record`` prints before it starts, ``store <policy> ...``)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("store ")]
    assert len(err) == 1, err
    assert err[0].startswith(f"vpstudy {command}: {kind}"), err[0]
    return err[0]


def same_runs(a: Path, b: Path) -> None:
    """Two runs hold the same samples (timing aside), steps and arrays (up to float rounding)."""
    left, right = vpstudy.open_run(a), vpstudy.open_run(b)
    assert left.sample_ids == right.sample_ids
    pd.testing.assert_frame_equal(left.samples.drop(columns=TIMING), right.samples.drop(columns=TIMING))
    pd.testing.assert_frame_equal(left.steps, right.steps)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "steps.parquet"), pd.read_parquet(b / "steps.parquet"))
    for sample_id in left.sample_ids:
        for name, array in left.arrays(sample_id).items():
            np.testing.assert_allclose(array, right.arrays(sample_id)[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def data4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data4"), n=4, seed=0)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path], data4: Path) -> Path:
    """``data4`` recorded without interruption (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert record(tiny_dirs["qwen2_vl"], data4, out) == 0
    return out


# --- model directories ------------------------------------------------------------------------------


def _broken_model(source: Path, where: Path, case: str) -> Path:
    model = where / "model"
    shutil.copytree(source, model)
    if case == "truncated weights":
        weights = model / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif case == "no weights":
        (model / "model.safetensors").unlink()
    elif case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (model / name).unlink(missing_ok=True)
    return model


@pytest.mark.parametrize("which", ["tiny", "organism"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated weights", r"model/model.safetensors: the weights cannot be read \(.*\): the file is truncated or "
                              r"corrupt; copy or download it again$"),
        ("no weights", r"model: holds no model weights \(model.safetensors or pytorch_model.bin\); copy or save"),
        ("no tokenizer", r"model: holds no tokenizer \(one of tokenizer.json, .*\); save the tokenizer into it"),
    ],
)  # fmt: skip
def test_a_broken_model_directory_is_one_line(which, case, message, tmp_path, tiny_dirs, data4, capsys):
    model = _broken_model(tiny_dirs["qwen2_vl"] if which == "tiny" else ORGANISM, tmp_path, case)
    assert record(model, data4, tmp_path / "run") == 2
    assert re.search(message, one_line(capsys, "record"))
    assert not (tmp_path / "run").exists()


def test_a_mistyped_local_model_path_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    start = time.perf_counter()
    assert record(Path("data/organism-lava"), Path("data/organism-eval/data.jsonl"), tmp_path / "run") == 2
    assert time.perf_counter() - start < 5  # no hub look-up
    line = one_line(capsys, "record")
    assert line.endswith("data/organism-lava: model directory does not exist; did you mean data/organism-llava?")
    assert looks_local("data/organism-lava") and looks_local("./x") and looks_local("~/x") and looks_local("a/b/c")
    assert not looks_local("Qwen/Qwen2-VL-2B-Instruct") and not looks_local("gpt2")


# --- devices, data, output paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", r"argument --device: device 'cuda': this torch build has no CUDA|no CUDA device is visible"),
     ("bogus", r"argument --device: device 'bogus' is not a device; use cpu, cuda, cuda:N or mps")],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_one_line(device, message, tmp_path, tiny_dirs, data4, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    assert record(tiny_dirs["qwen2_vl"], data4, tmp_path / "run", "--device", device) == 2
    assert re.search(message, one_line(capsys, "record"))
    assert not (tmp_path / "run").exists()


def test_jsonl_that_is_not_utf8_is_one_line(tmp_path, tiny_dirs, data4, capsys):
    data = data4.parent / "latin1.jsonl"
    lines = data4.read_text().splitlines()
    data.write_bytes("\n".join([lines[0], lines[1].replace("colour", "colour caf\u00e9")]).encode("latin-1") + b"\n")
    assert record(tiny_dirs["qwen2_vl"], data, tmp_path / "run") == 2
    assert re.search(r"latin1.jsonl:line 2: not UTF-8 text \(byte 0xe9 at column \d+\); save the file as UTF-8$",
                     one_line(capsys, "record"))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_out_below_an_existing_file_is_one_line(tmp_path, tiny_dirs, data4, capsys):
    (tmp_path / "notes").write_text("mine")
    assert record(tiny_dirs["qwen2_vl"], data4, tmp_path / "notes" / "run") == 2
    assert one_line(capsys, "record").endswith(
        f"--out {tmp_path}/notes/run: cannot be created because {tmp_path}/notes is a file, not a directory; "
        "choose another --out")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_read_only_output_directory_is_one_line(tmp_path, tiny_dirs, data4, clean_run, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    before = snapshot(out)
    for folder in [out, *(p for p in out.iterdir() if p.is_dir())]:
        folder.chmod(0o555)
    access = os.access  # root writes anywhere: report the directories as a non-root user would see them
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not str(p).startswith(str(out)))
    try:
        assert record(tiny_dirs["qwen2_vl"], data4, out) == 2
        assert re.search(rf"--out {out}: {out} is not writable \(permission denied or a read-only file system\); "
                         r"choose another --out or change its permissions$", one_line(capsys, "record"))  # fmt: skip
    finally:
        for folder in [out, *(p for p in out.iterdir() if p.is_dir())]:
            folder.chmod(0o755)
    assert snapshot(out) == before


def test_permission_denied_while_writing_is_one_line(tmp_path, tiny_dirs, data4, capsys, monkeypatch):
    import vpstudy.runs as runs

    def denied(table, file):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(runs, "_write_table", denied)
    assert record(tiny_dirs["qwen2_vl"], data4, tmp_path / "run") == 2
    assert re.search(r"run/steps.parquet/.tmp-.pending-part-000000-[0-9a-f]{16}.parquet: permission denied: choose a "
                     rf"path you can write to, or change its permissions; nothing was committed to {tmp_path}/run yet$",
                     one_line(capsys, "record"))  # fmt: skip


# --- interruptions: a full disk, Ctrl-C --------------------------------------------------------------


def test_a_full_disk_while_recording_then_the_rerun_resumes(tmp_path, tiny_dirs, data4, clean_run, capsys,
                                                            monkeypatch):  # fmt: skip
    import vpstudy.runs as runs

    write_table, calls = runs._write_table, []

    def full_after_two_samples(table, file):
        calls.append(file)
        if len(calls) == 5:  # two parts per sample: the 3rd sample's steps part
            file.write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        write_table(table, file)

    out = tmp_path / "run"
    monkeypatch.setattr(runs, "_write_table", full_after_two_samples)
    assert record(tiny_dirs["qwen2_vl"], data4, out) == 2
    line = one_line(capsys, "record")
    assert "no space left on device: free some space" in line
    assert line.endswith(f"the 2 samples committed to {out} are intact; rerun the same command to resume")
    assert list(pd.read_parquet(out / "samples.parquet")["sample_id"]) == ["tiny-0000", "tiny-0001"]
    assert set(pd.read_parquet(out / "steps.parquet")["sample_id"]) == {"tiny-0000", "tiny-0001"}
    monkeypatch.setattr(runs, "_write_table", write_table)
    assert record(tiny_dirs["qwen2_vl"], data4, out) == 0
    same_runs(out, clean_run)


def test_ctrl_c_during_record_keeps_the_committed_samples_and_the_rerun_resumes(tmp_path, tiny_dirs, data4, clean_run,
                                                                                 capsys, monkeypatch):  # fmt: skip
    import vpstudy.collect as collect

    prepare, calls = collect.prepare_batch, []

    def interrupt_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return prepare(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(collect, "prepare_batch", interrupt_third_batch)
    assert record(tiny_dirs["qwen2_vl"], data4, out) == 130
    assert one_line(capsys, "record", "interrupted") == (
        f"vpstudy record: interrupted (Ctrl-C); the 2 samples committed to {out} are intact; rerun the same command "
        "to resume")
    monkeypatch.setattr(collect, "prepare_batch", prepare)
    assert record(tiny_dirs["qwen2_vl"], data4, out) == 0
    same_runs(out, clean_run)


def test_ctrl_c_during_evaluate_then_the_rerun_resumes(tmp_path, tiny_dirs, data4, capsys, monkeypatch):
    import vpstudy.collect as collect

    prepare, calls = collect.prepare_batch, []

    def interrupt_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prepare(*args, **kwargs)

    args = ["evaluate", "--model", tiny_dirs["qwen2_vl"], "--data", data4, "--method", "topk", "--set", "ratio=0.5",
            "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    monkeypatch.setattr(collect, "prepare_batch", interrupt_second_batch)
    assert cli(*args, "--out", tmp_path / "run") == 130
    assert one_line(capsys, "evaluate", "interrupted").endswith(
        f"the 1 sample committed to {tmp_path / 'run'} is intact; rerun the same command to resume")
    monkeypatch.setattr(collect, "prepare_batch", prepare)
    assert cli(*args, "--out", tmp_path / "run") == 0
    assert cli(*args, "--out", tmp_path / "clean") == 0
    same_runs(tmp_path / "run", tmp_path / "clean")


def test_out_of_memory_while_recording_is_one_line(tmp_path, tiny_dirs, data4, capsys, monkeypatch):
    import vpstudy.collect as collect

    prepare, calls = collect.prepare_batch, []

    def out_of_memory_at_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        return prepare(*args, **kwargs)

    monkeypatch.setattr(collect, "prepare_batch", out_of_memory_at_second_batch)
    assert record(tiny_dirs["qwen2_vl"], data4, tmp_path / "run") == 2
    assert one_line(capsys, "record") == (
        "vpstudy record: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB more details): lower "
        f"--batch-size or --max-new-tokens; the 1 sample committed to {tmp_path / 'run'} is intact; rerun the same "
        "command to resume")


def test_sigint_to_a_recording_process_is_one_line_and_exit_130(tmp_path, tiny_dirs):
    data = make_tiny_dataset(tmp_path / "data", n=12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vpstudy.cli", "record", "--model", str(tiny_dirs["qwen2_vl"]), "--data", str(data),
           "--out", str(out), "--max-new-tokens", "48", "--batch-size", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((out / "samples.parquet").glob("part-*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "too slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("store ")]  # the size estimate aside
    assert len(lines) == 1 and re.fullmatch(rf"vpstudy record: interrupted \(Ctrl-C\); the \d+ samples? committed to "
                                            rf"{out} (is|are) intact; rerun the same command to resume", lines[0]), lines
    done = vpstudy.open_run(out).sample_ids
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert vpstudy.open_run(out).sample_ids[: len(done)] == done and len(vpstudy.open_run(out).samples) == 12


# --- the dataset a run was recorded from -------------------------------------------------------------


def test_a_run_resumes_with_its_dataset_or_a_prefix_of_it_and_refuses_another(tmp_path, tiny_dirs, tiny_data,
                                                                              capsys):  # fmt: skip
    out, model = tmp_path / "run", tiny_dirs["qwen2_vl"]
    assert record(model, tiny_data, out, "--limit", "2") == 0
    fingerprint = vpstudy.open_run(out).manifest["dataset"]["fingerprint"]
    assert fingerprint["records"] == 6 and len(fingerprint["sha256"]) == 64
    other = make_tiny_dataset(tmp_path / "other", n=6, seed=5)  # the same ids, other images and answers
    before = snapshot(out)
    capsys.readouterr()
    assert record(model, other, out) == 2
    assert re.search(r"this run was recorded from dataset .* \(6 records, sha256 [0-9a-f]{12}\), "
                     r"not .*other/data.jsonl", one_line(capsys, "record"))  # fmt: skip
    assert snapshot(out) == before
    assert record(model, tiny_data, out) == 0  # the whole dataset: resumes
    assert record(model, tiny_data, out, "--limit", "1") == 0  # a shorter prefix: nothing to do
    assert len(vpstudy.open_run(out).samples) == 6


def test_a_16_bit_png_is_recorded_like_its_8_bit_equivalent(tmp_path, tiny_dirs):
    ramp = (np.arange(84 * 84, dtype=np.int64).reshape(84, 84) * 65535 // (84 * 84 - 1)).astype(np.uint16)
    eight = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    runs = {}
    for name, image in (("deep", Image.fromarray(ramp)), ("flat", Image.fromarray(eight, mode="L"))):
        folder = tmp_path / name
        folder.mkdir()
        image.save(folder / "image.png")
        (folder / "data.jsonl").write_text(json.dumps({"id": "x", "image": "image.png", "question": "what colour"}))
        assert record(tiny_dirs["qwen2_vl"], folder / "data.jsonl", tmp_path / f"run-{name}") == 0
        runs[name] = vpstudy.open_run(tmp_path / f"run-{name}")
    with Image.open(tmp_path / "deep" / "image.png") as raw:
        assert raw.mode.startswith("I")  # a real 16-bit PNG
    np.testing.assert_array_equal(runs["deep"].scores("x"), runs["flat"].scores("x"))
    pd.testing.assert_frame_equal(runs["deep"].steps, runs["flat"].steps)


def test_a_dense_run_of_another_dataset_is_one_line(tmp_path, tiny_dirs, clean_run, capsys):
    other = make_tiny_dataset(tmp_path / "other", n=4, seed=5)
    assert cli("evaluate", "--model", tiny_dirs["qwen2_vl"], "--data", other, "--method", "topk", "--dense", clean_run,
               "--out", tmp_path / "run", "--no-progress") == 2  # fmt: skip
    assert re.search(rf"--dense {clean_run}: was recorded from dataset .*data4.*/data.jsonl \(4 records, sha256 "
                     r"[0-9a-f]{12}\), not .*other/data.jsonl .*; pass a dense run of this dataset$",
                     one_line(capsys, "evaluate"))  # fmt: skip
    assert not (tmp_path / "run").exists()


# --- settings ----------------------------------------------------------------------------------------


def test_analyze_with_a_missing_data_file_is_one_line(clean_run, tmp_path, capsys):
    before = snapshot(clean_run)
    assert cli("analyze", clean_run, "--data", tmp_path / "nope.jsonl") == 2
    assert one_line(capsys, "analyze").endswith(f"--data {tmp_path}/nope.jsonl: no such file or directory (the "
                                                "dataset with trace annotations)")  # fmt: skip
    assert snapshot(clean_run) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit-budget", "RUN", "--layer", "0", "--delta", "0.001", "--out", "OUT", "--holdout", "1.5"],
         "argument --holdout: must be strictly between 0 and 1, got 1.5"),
        (["fit-budget", "RUN", "--layer", "0", "--delta", "0.001", "--out", "OUT", "--holdout", "0"],
         "argument --holdout: must be strictly between 0 and 1, got 0"),
        (["fit-budget", "RUN", "--layer", "0", "--delta", "-1", "--out", "OUT"],
         "argument --delta: threshold '-1' must be a finite number >= 0"),
        (["fit-budget", "RUN", "--layer", "0", "--delta", "0.001", "--out", "OUT", "--b-min", "0"],
         r"argument --b-min: must be in \(0, 1\], got 0"),
        (["fit-budget", "RUN", "--layer", "0", "--delta", "0.001", "--out", "OUT", "--b-min", "0.5", "--b-max", "0.1"],
         "--b-min 0.5 is above --b-max 0.1; the clamps need b_min <= b_max"),
        (["fit-budget", "RUN", "--layer", "0", "--delta", "0.001", "--out", "OUT", "--seed", "-1"],
         r"argument --seed: must be an integer in \[0, 2\*\*63\), got -1"),
        (["analyze", "RUN", "--n-boot", "5"], "argument --n-boot: must be >= 20"),
        (["analyze", "RUN", "--n-perm", "0"], "argument --n-perm: must be >= 20"),
        (["record", "--model", "M", "--data", "D", "--out", "OUT", "--thresholds", "0.001", "abc"],
         "argument --thresholds: threshold 'abc' is neither a number nor 'k/Nv'"),
        (["record", "--model", "M", "--data", "D", "--out", "OUT", "--max-new-tokens", "0"],
         "argument --max-new-tokens: must be >= 1, got 0"),
        (["evaluate", "--model", "M", "--data", "D", "--method", "all", "--out", "OUT", "--budgets", "0.05", "1.5"],
         r"argument --budgets: must be in \(0, 1\], got 1.5"),
        (["train-organism", "--family", "llava", "--out", "OUT", "--seed", "0", "--lr", "0"],
         "argument --lr: must be > 0, got 0"),
    ],
)  # fmt: skip
def test_out_of_range_settings_are_one_line_and_write_nothing(argv, message, clean_run, tiny_dirs, data4, tmp_path,
                                                              capsys):  # fmt: skip
    names = {"RUN": clean_run, "OUT": tmp_path / "out", "M": tiny_dirs["qwen2_vl"], "D": data4}
    before = snapshot(clean_run)
    assert cli(*[names.get(a, a) for a in argv]) == 2
    assert re.search(message, one_line(capsys, argv[0]))
    assert not (tmp_path / "out").exists() and snapshot(clean_run) == before


def test_evaluate_all_checks_every_row_before_the_first_run_is_written(tmp_path, tiny_dirs, data4, capsys):
    foreign = BudgetRule(signal="mass", b_min=0.01, b_max=0.2, layer=1,
                         model={"config_hash": "other", "path": "/elsewhere"})
    foreign.save(tmp_path / "foreign.json")
    before = snapshot(tmp_path)
    common = ["evaluate", "--model", tiny_dirs["qwen2_vl"], "--data", data4, "--method", "all",
              "--out", tmp_path / "all"]  # fmt: skip
    assert cli(*common, "--rule", tmp_path / "foreign.json") == 2
    assert re.search(r"--method all, row visionpulse-fitted: .*was fitted on model /elsewhere \(config other\)",
                     one_line(capsys, "evaluate"))  # fmt: skip
    assert cli(*common, "--set", "ratio=0.1") == 2
    assert one_line(capsys, "evaluate").endswith("--set does not apply to --method all")
    assert snapshot(tmp_path) == before and not (tmp_path / "all").exists()


def test_decoding_past_the_model_positions_warns_in_one_line(tmp_path, data4, capsys):
    model = make_tiny("qwen2_vl", tmp_path / "short", text_overrides={"max_position_embeddings": 24})
    assert cli("record", "--model", model, "--data", data4, "--out", tmp_path / "run", "--max-new-tokens", "20",
               "--limit", "2", "--no-progress") == 0  # fmt: skip
    line = one_line(capsys, "record", "warning")
    assert re.search(r"data.jsonl:line 1: prompt of \d+ tokens \+ --max-new-tokens 20 = \d+ positions, past the "
                     r"model's max_position_embeddings 24; .*lower --max-new-tokens to \d+", line)  # fmt: skip


# --- help --------------------------------------------------------------------------------------------


def test_help_describes_every_command_option_default_and_an_example(capsys):
    from vpstudy.cli import build_parser

    parser = build_parser()
    assert cli("--help") == 0
    top = capsys.readouterr().out
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        assert re.search(rf"^    {name}\b", top, re.M), name
        assert cli(name, "--help") == 0
        text = " ".join(capsys.readouterr().out.split())
        assert command.description and " ".join(command.description.split())[:40] in text, name
        assert "example: vpstudy " + name in text, name
        for action in command._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if not action.required:
                assert "default" in command._get_formatter()._get_help_string(action).lower(), (
                    f"{name} {action.option_strings[0]} shows no default")
    assert "--no-progress" in commands["record"].format_help()
