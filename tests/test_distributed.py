"""Data-parallel runs (vpstudy/distributed.py): `torchrun` and `accelerate launch` of 2 CPU processes
(gloo) record and evaluate the shipped LLaVA organism into runs equal, value for value, to a
single-process run; a rank killed with SIGKILL mid-run loses nothing committed and a rerun
resumes every shard; a world size that does not match the shards is one line that changes
nothing.

Columns excepted from the equality (provenance, not recorded values): ``batch_prefill_s`` and
``batch_decode_s`` in samples.parquet (wall times of the batch's forwards), ``created`` in the
manifest (a timestamp), and in eval.json ``run`` (the path) and the timings summed from those
columns (``prefill_s``, ``decode_s``, ``decode_ms_per_step``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from helpers import snapshot

import vpstudy
from vpstudy.cli import main
from vpstudy.distributed import (DistributedError, Launch, check_world_size, launch, run_sharded, shard_batches,
                                 shard_dir, shards_root)  # fmt: skip
from vpstudy.runs import RunWriter, committed_ids, merge_runs

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = ROOT / "data" / "organism-llava"
EVAL_SET = ROOT / "data" / "organism-eval" / "data.jsonl"
TIMINGS = ["batch_prefill_s", "batch_decode_s"]  # wall times: the only columns a merged run may differ in
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """The launched processes decode with one torch thread (``OMP_NUM_THREADS=1``); so does this
    process while the test runs, so that matmul reductions, and every last bit of the values
    compared, are the same whatever thread count pytest was started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", "0", "-m", "vpstudy", *args]  # fmt: skip


def _accelerate(*args: str) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "vpstudy", *args]  # fmt: skip


def _decode_args(out: Path, limit: int, *extra: str) -> list[str]:
    return ["--model", str(ORGANISM), "--data", str(EVAL_SET), "--out", str(out), "--limit", str(limit),
            "--no-progress", *extra]  # fmt: skip


def assert_same_run(merged: Path, single: Path) -> None:
    """Every recorded value equal: samples (but the wall times), steps, every array, the manifest
    (but its timestamp)."""
    a, b = vpstudy.open_run(merged), vpstudy.open_run(single)
    assert a.sample_ids == b.sample_ids  # the single-process order
    pd.testing.assert_frame_equal(a.samples.drop(columns=TIMINGS), b.samples.drop(columns=TIMINGS), check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    for sample_id in a.sample_ids:
        ours, theirs = a.arrays(sample_id), b.arrays(sample_id)
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{sample_id} {name}")
    drop = {"created"}
    assert {k: v for k, v in a.manifest.items() if k not in drop} == {k: v for k, v in b.manifest.items()
                                                                       if k not in drop}  # fmt: skip
    assert not shards_root(merged).exists()  # removed once merged


# --- units ------------------------------------------------------------------------------------


def test_launch_reads_the_launcher_environment():
    assert launch({}) == Launch(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch(env) == Launch(3, 8, 1, 2) and launch(env).distributed and not launch(env).main
    with pytest.raises(DistributedError, match=r"^RANK 8 is not within WORLD_SIZE 8"):
        launch({"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(DistributedError, match=r"WORLD_SIZE='two' is not an integer"):
        launch({"WORLD_SIZE": "two"})


@pytest.mark.parametrize("n, batch, world", [(7, 2, 2), (10, 3, 4), (3, 4, 3), (16, 1, 8)])
def test_shards_partition_the_batches(n, batch, world):
    items = list(range(n))
    shards = [shard_batches(items, batch, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == items  # every sample exactly once
    single = [items[i : i + batch] for i in range(0, n, batch)]
    for rank, shard in enumerate(shards):  # re-batching a shard gives the single-process batches
        assert [shard[i : i + batch] for i in range(0, len(shard), batch)] == single[rank::world]


def test_merge_follows_the_given_order_and_links_the_files(tmp_path):
    manifest = {"kind": "record", "layers": [0]}
    rows = {i: ({"sample_id": f"s{i}", "x": i}, pd.DataFrame({"sample_id": [f"s{i}"] * 2, "step": [0, 1]}),
                {"scores": np.full((2, 1, 3), i, dtype=np.float16)}) for i in range(5)}  # fmt: skip
    shards = [tmp_path / "a", tmp_path / "b"]
    for path, ids in zip(shards, ([0, 2, 4], [1, 3]), strict=True):
        with RunWriter(path, {**manifest, "shard": path.name, "created": path.name}) as writer:
            for i in ids:
                writer.write_sample(*rows[i])
    merged = merge_runs(tmp_path / "out", shards, order=["s0", "s1", "s2", "s3", "s4"])
    assert merged.sample_ids == ["s0", "s1", "s2", "s3", "s4"] and "shard" not in merged.manifest
    part = next((tmp_path / "out" / "samples.parquet").glob("part-*"))
    assert part.stat().st_nlink == 2  # hard-linked to the shard's part, not copied
    assert committed_ids(tmp_path / "out") == merged.sample_ids


def test_a_world_size_other_than_the_shards_is_refused(tmp_path):
    out = tmp_path / "run"
    shard_dir(out, 1, 2).mkdir(parents=True)
    check_world_size(out, 2)
    message = r"run\.shards: holds the unfinished shards of a run launched with 2 processes, not 4; rerun with torchrun"
    with pytest.raises(DistributedError, match=message + " --nproc-per-node 2"):
        check_world_size(out, 4)
    with pytest.raises(DistributedError, match="not 1"):
        check_world_size(out, 1)


def test_run_sharded_without_a_process_group_uses_the_done_files(tmp_path, monkeypatch):
    """Two ranks in threads, no MASTER_ADDR: each records its batches, rank 0 merges in order."""
    import threading

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out, ids = tmp_path / "run", [f"s{i}" for i in range(5)]

    def record(shard):
        with RunWriter(shard.path, {"kind": "record", "shard": shard.manifest_entry()}) as writer:
            for b in range(3):  # batches of 2
                if shard.takes(b):
                    for i in ids[2 * b : 2 * b + 2]:
                        writer.write_sample({"sample_id": i}, pd.DataFrame({"sample_id": [i]}), {})

    results = {}

    def rank(r):
        results[r] = run_sharded(out, Launch(r, 2, r, 2), ids, 2, record,
                                 lambda paths: merge_runs(out, paths, order=ids).sample_ids)  # fmt: skip

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: ids, 1: None} and committed_ids(out) == ids and not shards_root(out).exists()


# --- launches of 2 CPU processes ----------------------------------------------------------------


def test_torchrun_record_equals_one_process(tmp_path, capsys):
    single, merged = tmp_path / "single", tmp_path / "merged"
    args = _decode_args(merged, 6, "--max-new-tokens", "12", "--batch-size", "2")
    done = subprocess.run(_torchrun("record", *args), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("6 samples") == 1  # rank 0 alone reports the merged run
    assert main(["record", *_decode_args(single, 6, "--max-new-tokens", "12", "--batch-size", "2")]) == 0
    assert_same_run(merged, single)
    # batches of 2 went to ranks 0, 1, 0: the merged run lists them in the single-process order
    assert list(vpstudy.open_run(merged).samples["batch"]) == [0, 0, 1, 1, 2, 2]


def test_accelerate_evaluate_with_sampling_and_repeats_equals_one_process(tmp_path, capsys):
    single, merged = tmp_path / "single", tmp_path / "merged"
    flags = ["--method", "visionpulse", "--max-new-tokens", "10", "--batch-size", "2", "--paper-sampling",
             "--repeats", "2", "--seed", "5"]  # fmt: skip
    done = subprocess.run(_accelerate("evaluate", *_decode_args(merged, 3, *flags)), env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["evaluate", *_decode_args(single, 3, *flags)]) == 0
    assert_same_run(merged, single)
    run = vpstudy.open_run(merged)
    assert run.sample_ids == [f"organism-000{i}#r{k}" for i in range(3) for k in range(2)]
    generation = run.manifest["generation"]
    assert generation["do_sample"] is True and generation["repeats"] == 2 and generation["top_k"] == 20
    ours, theirs = (json.loads((p / "eval.json").read_text()) for p in (merged, single))
    provenance = {"run", "prefill_s", "decode_s", "decode_ms_per_step"}
    assert {k: v for k, v in ours.items() if k not in provenance} == {k: v for k, v in theirs.items()
                                                                      if k not in provenance}  # fmt: skip
    assert ours["repeats"]["n"] == 2 and ours["repeats"]["examples"] == 3


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "vpstudy" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_kill_9_of_one_rank_then_rerun_equals_one_process(tmp_path, capsys):
    single, merged = tmp_path / "single", tmp_path / "merged"
    args = _decode_args(merged, 12, "--max-new-tokens", "24", "--batch-size", "1")
    launcher = subprocess.Popen(_torchrun("record", *args), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    rank1 = shard_dir(merged, 1, 2)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((rank1 / "samples.parquet").glob("part-*"))) < 2:
        time.sleep(0.05)
    worker = _worker(launcher, 1)
    assert worker is not None, "rank 1 should be running"
    os.kill(worker.pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    held = committed_ids(rank1)
    assert 2 <= len(held) < 6, "rank 1 should have been killed part-way through its 6 samples"
    assert not merged.exists()  # nothing merged from an unfinished launch

    # a single process (world size 1) on the unfinished shards: one line, nothing touched
    before = snapshot(shards_root(merged))
    assert main(["record", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "launched with 2 processes, not 1" in err and "--nproc-per-node 2" in err
    assert snapshot(shards_root(merged)) == before

    done = subprocess.run(_torchrun("record", *args), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["record", *_decode_args(single, 12, "--max-new-tokens", "24", "--batch-size", "1")]) == 0
    assert_same_run(merged, single)
