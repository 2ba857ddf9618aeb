"""Tests for vpstudy.runs: roundtrip, resume, crash safety, errors and merging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import snapshot
from vpstudy.runs import (
    SCHEMA_VERSION,
    RunStoreError,
    RunWriter,
    merge_runs,
    open_run,
    sample_key,
)

REPO = Path(__file__).resolve().parents[1]
MANIFEST = {"model": "tiny-vlm", "dataset": "toy", "layers": [0, 1], "seed": 0}


def make_sample(sample_id: str, n_steps: int = 3, n_layers: int = 2, n_v: int = 5):
    """A sample row, its steps frame (shuffled rows) and its arrays."""
    rng = np.random.default_rng(abs(hash(sample_id)) % 2**32)
    steps = pd.DataFrame(
        [
            {"sample_id": sample_id, "step": s, "layer": l, "mass": float(rng.random())}
            for s in range(n_steps)
            for l in range(n_layers)
        ]
    )
    arrays = {
        "scores": rng.random((n_steps, n_layers, n_v)).astype(np.float16),
        "max_scores": rng.random((n_layers, n_v)).astype(np.float32),
    }
    sample = {"sample_id": sample_id, "n_steps": n_steps, "answer": f"ans {sample_id}"}
    return sample, steps.sample(frac=1.0, random_state=0), arrays


def sorted_steps(steps: pd.DataFrame) -> pd.DataFrame:
    return steps.sort_values(["step", "layer"]).reset_index(drop=True)


def test_roundtrip(tmp_path: Path) -> None:
    ids = ["a/b", "../x", "ü ñ?*", ""]
    written = [make_sample(i, n_steps=k + 1) for k, i in enumerate(ids)]
    with RunWriter(tmp_path / "run", MANIFEST) as writer:
        for sample, steps, arrays in written:
            writer.write_sample(sample, steps, arrays)
        assert writer.done_ids == set(ids)

    run = open_run(tmp_path / "run")
    assert run.manifest == {**MANIFEST, "schema_version": SCHEMA_VERSION}
    assert run.sample_ids == ids
    pd.testing.assert_frame_equal(run.samples, pd.DataFrame([s for s, _, _ in written]))
    expected_steps = pd.concat([sorted_steps(st) for _, st, _ in written], ignore_index=True)
    pd.testing.assert_frame_equal(run.steps, expected_steps)
    for sample_id, (_, _, arrays) in zip(ids, written):
        loaded = run.arrays(sample_id)
        assert set(loaded) == {"scores", "max_scores"}
        for name, array in arrays.items():
            assert isinstance(loaded[name], np.memmap)
            assert loaded[name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name], array)
        np.testing.assert_array_equal(run.scores(sample_id), arrays["scores"])
    # The part directories are plain parquet datasets too.
    assert list(pd.read_parquet(tmp_path / "run" / "samples.parquet")["sample_id"]) == ids
    assert len(pd.read_parquet(tmp_path / "run" / "steps.parquet")) == len(expected_steps)
    with pytest.raises(RunStoreError, match="no sample 'nope'"):
        run.arrays("nope")


def test_empty_run(tmp_path: Path) -> None:
    RunWriter(tmp_path / "run", MANIFEST)
    run = open_run(tmp_path / "run")
    assert run.sample_ids == []
    assert "sample_id" in run.samples.columns and run.samples.empty
    assert "sample_id" in run.steps.columns and run.steps.empty


def test_resume_skips_done_and_never_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunWriter(path, MANIFEST) as writer:
        for sample_id in ["s0", "s1"]:
            writer.write_sample(*make_sample(sample_id))
    manifest_before = snapshot(path)["manifest.json"]

    writer = RunWriter(path, {**MANIFEST, "note": "resumed"}, compare_keys=["layers"])
    assert writer.done_ids == {"s0", "s1"}
    assert writer.manifest == {**MANIFEST, "schema_version": SCHEMA_VERSION}
    assert snapshot(path)["manifest.json"] == manifest_before
    with pytest.raises(RunStoreError, match="'s1' is already committed"):
        writer.write_sample(*make_sample("s1"))
    writer.write_sample(*make_sample("s2"))

    run = open_run(path)
    assert run.sample_ids == ["s0", "s1", "s2"]
    assert run.steps.groupby("sample_id").size().to_dict() == {"s0": 6, "s1": 6, "s2": 6}


def test_write_sample_validation(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run", MANIFEST)
    sample, steps, arrays = make_sample("s0")
    with pytest.raises(RunStoreError, match="must have sample_id == 's0'"):
        writer.write_sample(sample, steps.assign(sample_id="other"), arrays)
    with pytest.raises(RunStoreError, match="array '../evil'"):
        writer.write_sample(sample, steps, {"../evil": np.zeros(2)})
    with pytest.raises(RunStoreError, match="sample_id must be a str"):
        writer.write_sample({"sample_id": 3}, steps, arrays)
    assert open_run(tmp_path / "run").sample_ids == []


def fake_crash(path: Path, sample_id: str, seq: int) -> None:
    """Leave what a writer killed mid-sample leaves: arrays, steps part, temp files."""
    key = sample_key(sample_id)
    _, steps, arrays = make_sample(sample_id)
    (path / "arrays" / key).mkdir()
    np.save(path / "arrays" / key / "scores.npy", arrays["scores"])
    steps.to_parquet(path / "steps.parquet" / f"part-{seq:06d}-{key}.parquet", index=False)
    (path / "samples.parquet" / f".tmp-part-{seq:06d}-{key}.parquet").write_bytes(b"half")
    (path / "steps.parquet" / ".tmp-junk.parquet").write_bytes(b"half")
    (path / "arrays" / ".tmp-abc123").mkdir()
    (path / ".tmp-manifest.json").write_text("{")


def test_simulated_crash_is_invisible_and_cleaned_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunWriter(path, MANIFEST) as writer:
        writer.write_sample(*make_sample("s0"))
    fake_crash(path, "s1", seq=1)

    run = open_run(path)
    assert run.sample_ids == ["s0"]
    assert set(run.steps["sample_id"]) == {"s0"}

    writer = RunWriter(path, MANIFEST)
    assert writer.done_ids == {"s0"}
    leftovers = sorted(p.name for p in path.rglob("*") if p.name.startswith(".tmp-"))
    assert leftovers == []
    assert sorted(p.name for p in (path / "arrays").iterdir()) == [sample_key("s0")]
    assert len(list((path / "steps.parquet").iterdir())) == 1

    writer.write_sample(*make_sample("s1"))
    run = open_run(path)
    assert run.sample_ids == ["s0", "s1"]
    assert run.steps["sample_id"].value_counts().to_dict() == {"s0": 6, "s1": 6}


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pandas as pd
    from vpstudy.runs import RunWriter

    writer = RunWriter(sys.argv[1], {"model": "m"})
    for i in range(int(sys.argv[2])):
        sid = f"s{i}"
        if sid in writer.done_ids:
            continue
        steps = pd.DataFrame({"sample_id": sid, "step": np.arange(50), "layer": 0, "v": np.arange(50.0)})
        arrays = {"scores": np.full((50, 4, 256), i, np.float16), "max_scores": np.ones((4, 256), np.float32)}
        writer.write_sample({"sample_id": sid, "i": i}, steps, arrays)
        time.sleep(float(sys.argv[3]))
    """
)


def run_writer(path: Path, n: int, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), str(n), str(sleep)], env=env)


def test_kill_9_loses_at_most_the_inflight_sample(tmp_path: Path) -> None:
    path, n = tmp_path / "run", 40
    proc = run_writer(path, n, sleep=0.01)
    deadline = time.monotonic() + 30
    while len(list((path / "samples.parquet").glob("part-*"))) < 4:
        assert proc.poll() is None, "writer exited early"
        assert time.monotonic() < deadline, "writer too slow"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    run = open_run(path)
    committed = run.sample_ids
    assert 4 <= len(committed) < n
    assert committed == [f"s{i}" for i in range(len(committed))]
    assert run.steps.groupby("sample_id").size().to_dict() == dict.fromkeys(committed, 50)
    for i, sample_id in enumerate(committed):
        assert run.scores(sample_id).shape == (50, 4, 256)
        assert (run.scores(sample_id) == i).all()

    resumed = run_writer(path, n, sleep=0.0)
    assert resumed.wait(timeout=60) == 0
    run = open_run(path)
    assert run.sample_ids == [f"s{i}" for i in range(n)]
    assert len(run.steps) == 50 * n
    assert len(list((path / "arrays").iterdir())) == n


def test_schema_mismatch_leaves_run_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunWriter(path, MANIFEST) as writer:
        writer.write_sample(*make_sample("s0"))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 0}))
    fake_crash(path, "s1", seq=1)  # leftovers must survive the failed resume too
    before = snapshot(path)

    with pytest.raises(RunStoreError) as err:
        RunWriter(path, MANIFEST)
    assert str(err.value) == (
        f"{path}/manifest.json: schema version 0, this vpstudy writes 1; use a new --out directory"
    )
    with pytest.raises(RunStoreError) as err:
        open_run(path)
    assert str(err.value) == f"{path}/manifest.json: written by schema version 0, this vpstudy reads 1"
    assert snapshot(path) == before


def test_compare_keys_mismatch_leaves_run_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunWriter(path, MANIFEST) as writer:
        writer.write_sample(*make_sample("s0"))
    fake_crash(path, "s1", seq=1)
    before = snapshot(path)

    with pytest.raises(RunStoreError) as err:
        RunWriter(path, {**MANIFEST, "layers": [0], "seed": 1}, compare_keys=["layers", "model"])
    assert str(err.value) == (
        f"{path}: existing run was recorded with different layers (stored [0, 1], requested [0]); "
        "use a new --out directory"
    )
    assert snapshot(path) == before
    # A key not in compare_keys may differ.
    RunWriter(path, {**MANIFEST, "seed": 1}, compare_keys=["layers", "model"])


def test_writer_refuses_foreign_or_broken_directories(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunStoreError, match=f"^{foreign}: directory exists and is not a vpstudy run$"):
        RunWriter(foreign, MANIFEST)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(RunStoreError, match=f"^{broken}/manifest.json: cannot be read as JSON"):
        RunWriter(broken, MANIFEST)
    with pytest.raises(RunStoreError, match=f"^{broken}/manifest.json: cannot be read as JSON"):
        open_run(broken)
    assert [p.name for p in broken.iterdir()] == ["manifest.json"]

    (tmp_path / "empty").mkdir()  # an empty directory is a fine place for a new run
    RunWriter(tmp_path / "empty", MANIFEST)
    assert open_run(tmp_path / "empty").manifest["model"] == "tiny-vlm"


def test_open_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunStoreError, match="no such run directory"):
        open_run(tmp_path / "missing")
    with pytest.raises(RunStoreError, match=f"^{tmp_path}/manifest.json: missing"):
        open_run(tmp_path)


def test_merge_runs(tmp_path: Path) -> None:
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    samples = {i: make_sample(f"s{i}") for i in range(5)}
    for rank, ids in enumerate([[0, 2, 4], [1, 3, 4]]):  # s4 is in both, identical
        with RunWriter(shards[rank], {**MANIFEST, "shard": rank}) as writer:
            for i in ids:
                writer.write_sample(*samples[i])

    merged = merge_runs(tmp_path / "merged", shards)
    assert merged.manifest == {**MANIFEST, "schema_version": SCHEMA_VERSION}
    assert merged.sample_ids == ["s0", "s2", "s4", "s1", "s3"]
    assert merged.steps["sample_id"].value_counts().to_dict() == dict.fromkeys(merged.sample_ids, 6)
    for i, (_, _, arrays) in samples.items():
        np.testing.assert_array_equal(merged.scores(f"s{i}"), arrays["scores"])
    # Merging again resumes: nothing is duplicated.
    assert merge_runs(tmp_path / "merged", shards).sample_ids == merged.sample_ids

    conflicting = tmp_path / "shard2"
    with RunWriter(conflicting, {**MANIFEST, "shard": 2}) as writer:
        sample, steps, arrays = samples[0]
        writer.write_sample({**sample, "answer": "different"}, steps, arrays)
    with pytest.raises(RunStoreError, match="sample 's0' conflicts"):
        merge_runs(tmp_path / "merged2", [*shards, conflicting])

    other_model = tmp_path / "shard3"
    RunWriter(other_model, {**MANIFEST, "model": "other", "shard": 3})
    with pytest.raises(RunStoreError, match="manifest differs .* in model$"):
        merge_runs(tmp_path / "merged3", [shards[0], other_model])


# --- the commit sequence under kill -9 ----------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, pandas as pd
    import vpstudy.runs as runs

    path, kill_at, mid_write = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    events = [0]
    rename, write_table = runs._rename, runs._write_table

    def event(write_partial=None):
        events[0] += 1
        if events[0] == kill_at:
            if write_partial is not None:
                write_partial()
            os.kill(os.getpid(), signal.SIGKILL)

    def killing_rename(src, dst):
        event()
        rename(src, dst)

    def killing_write(table, file):
        def half():
            write_table(table, file)
            data = open(file, "rb").read()
            open(file, "wb").write(data[: len(data) // 2])
        event(half if mid_write else None)
        write_table(table, file)

    runs._rename, runs._write_table = killing_rename, killing_write
    writer = runs.RunWriter(path, {"model": "m"})
    sid = "s1"
    steps = pd.DataFrame({"sample_id": sid, "step": np.arange(4), "layer": 0, "v": np.arange(4.0)})
    writer.write_sample({"sample_id": sid, "i": 1}, steps, {"scores": np.full((4, 1, 8), 1, np.float16)})
    """
)


def kill_sample(i: int):
    steps = pd.DataFrame({"sample_id": f"s{i}", "step": np.arange(4), "layer": 0, "v": np.arange(4.0)})
    return {"sample_id": f"s{i}", "i": i}, steps, {"scores": np.full((4, 1, 8), i, np.float16)}


# the events of one commit, in order: 1 rename arrays dir, 2 write steps, 3 rename steps to pending,
# 4 write samples, 5 rename samples into place (the commit), 6 rename pending steps into place;
# 7 is past the end (the sample is committed and nothing is killed)
KILL_POINTS = [(k, False) for k in range(1, 8)] + [(2, True), (4, True)]


@pytest.mark.parametrize(("kill_at", "mid_write"), KILL_POINTS)
def test_kill_at_each_point_of_the_commit_leaves_nothing_pandas_would_misread(tmp_path: Path, kill_at: int,
                                                                              mid_write: bool) -> None:  # fmt: skip
    path = tmp_path / "run"
    with RunWriter(path, {"model": "m"}) as writer:
        writer.write_sample(*kill_sample(0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path), str(kill_at), "1" if mid_write else "0"],
                          env=env, capture_output=True)  # fmt: skip
    assert proc.returncode == (0 if kill_at == 7 else -signal.SIGKILL), proc.stderr

    # what a plain pandas reader sees: every visible steps part has its samples row
    samples = pd.read_parquet(path / "samples.parquet")
    steps = pd.read_parquet(path / "steps.parquet")
    committed = kill_at >= 6
    assert list(samples["sample_id"]) == (["s0", "s1"] if committed else ["s0"])
    assert set(steps["sample_id"]) <= set(samples["sample_id"])
    assert set(steps["sample_id"]) == ({"s0", "s1"} if kill_at == 7 else {"s0"})  # s1's steps stay hidden until 6
    # open_run sees each committed sample whole (reading a still-pending steps part)
    run = open_run(path)
    assert run.sample_ids == list(samples["sample_id"])
    assert run.steps.groupby("sample_id").size().to_dict() == dict.fromkeys(run.sample_ids, 4)

    # a resume repairs the run and it ends equal to an uninterrupted one
    with RunWriter(path, {"model": "m"}) as writer:
        for i in (1, 2):
            if f"s{i}" not in writer.done_ids:
                writer.write_sample(*kill_sample(i))
    with RunWriter(tmp_path / "clean", {"model": "m"}) as writer:
        for i in (0, 1, 2):
            writer.write_sample(*kill_sample(i))
    resumed, clean = open_run(path), open_run(tmp_path / "clean")
    pd.testing.assert_frame_equal(resumed.samples, clean.samples)
    pd.testing.assert_frame_equal(resumed.steps, clean.steps)
    plain = [pd.read_parquet(p / "steps.parquet") for p in (path, tmp_path / "clean")]
    pd.testing.assert_frame_equal(*plain)
    for sample_id in clean.sample_ids:
        np.testing.assert_array_equal(resumed.scores(sample_id), clean.scores(sample_id))
    assert [p.name for p in path.rglob(".*")] == []  # no temporary or pending file is left


def test_a_full_disk_mid_commit_leaves_the_run_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import vpstudy.runs as runs

    path = tmp_path / "run"
    writer = RunWriter(path, MANIFEST)
    writer.write_sample(*make_sample("s0"))
    before = snapshot(path)
    write_table = runs._write_table
    calls = []

    def full_disk(table, file):
        calls.append(file)
        if len(calls) == 2:  # the samples part of s1: its steps part is already written (hidden)
            file.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        write_table(table, file)

    monkeypatch.setattr(runs, "_write_table", full_disk)
    with pytest.raises(OSError) as err:
        writer.write_sample(*make_sample("s1"))
    assert err.value.errno == errno.ENOSPC
    assert snapshot(path) == before  # this attempt's files are gone, the committed sample untouched
    monkeypatch.setattr(runs, "_write_table", write_table)
    writer.write_sample(*make_sample("s1"))  # the same writer goes on once there is space
    assert open_run(path).sample_ids == ["s0", "s1"]


def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpstudy.runs import check_output_path

    (tmp_path / "file").write_text("x")
    check_output_path(tmp_path / "new" / "run")  # nothing is created
    assert not (tmp_path / "new").exists()
    with pytest.raises(RunStoreError, match=r"--out .*/file/run: cannot be created because .*/file is a file"):
        check_output_path(tmp_path / "file" / "run")
    with pytest.raises(RunStoreError, match=r"--out .*/file: exists and is not a directory"):
        check_output_path(tmp_path / "file")
    with pytest.raises(RunStoreError, match=r"--out .*: is a directory, not a file"):
        check_output_path(tmp_path, kind="file")
    check_output_path(tmp_path / "file", kind="file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not str(p).startswith(str(locked)))
    with pytest.raises(RunStoreError, match=r"locked is not writable \(permission denied or a read-only file system\)"):
        check_output_path(locked / "run")
    locked.chmod(0o755)
