"""Data-parallel runs on an existing launcher: ``torchrun`` or ``accelerate launch``.

``torchrun --nproc-per-node N -m vpstudy record ...`` (or ``accelerate launch --num_processes N -m
vpstudy record ...``, which starts the same processes) gives every process ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
environment. vpstudy reads them (:func:`launch`) and (:func:`run_sharded`):

1. splits the samples **by batch**: batch b (samples b·B … (b+1)·B − 1 of the run's order, as a
   single process forms them) goes to rank b mod N (:func:`shard_batches`), so every batch is
   decoded exactly as in a single-process run (the same rows, the same padding, the same
   per-batch seeds): the merged run equals a single-process run value for value;
2. each rank records its batches into its own shard store, ``OUT.shards/rank-<r>-of-<N>/`` (a run
   of its own: atomic per sample, resumable), skipping samples the merged run ``OUT`` already
   holds, and marks it finished (``.done``);
3. when every rank has finished (a ``gloo`` barrier; without a launcher's address, the ``.done``
   files), rank 0 checks that every shard holds its samples, merges the shards into ``OUT``
   (:func:`vpstudy.runs.merge_runs`, in the single-process order of the samples, hard-linking
   the files where it can), and removes ``OUT.shards``; a second barrier holds every rank until
   the merged run is on disk.

A rerun of the same command resumes every shard (and the merge). A rerun with another world
size, a single process included, is refused while the shards of the first are there.
``--device-map auto`` instead spreads one model over several devices of one process
(:mod:`vpstudy.devices`); the two combine (each process of a node takes its own GPUs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from .errors import VpstudyError
from .runs import committed_ids

T = TypeVar("T")
SHARDS_SUFFIX = ".shards"
DONE = ".done"
# ranks finish their shards at different times (a paper-scale batch decodes for many minutes), so
# the barrier waits long; VPSTUDY_BARRIER_TIMEOUT_S overrides it (seconds)
BARRIER_TIMEOUT_S = 72 * 3600


class DistributedError(VpstudyError):
    """A launch that cannot run: a world size that does not match existing shards, a rank that
    does not finish, bad launcher variables (one-line message)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch (``rank`` 0 of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        """More than one process records."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that merges and writes the summaries."""
        return self.rank == 0


@dataclass(frozen=True)
class Shard:
    """What one rank records: its batches of the run's samples, into ``path``.

    Attributes:
        rank, world_size: this rank and the launch's number of ranks.
        out: the merged run the shard is part of.
        path: the shard store, ``OUT.shards/rank-<r>-of-<N>``.
        skip: sample ids the merged run already holds (not recorded again).
    """

    rank: int
    world_size: int
    out: Path
    path: Path
    skip: frozenset[str] = field(default_factory=frozenset)

    def takes(self, batch_index: int) -> bool:
        """Whether batch ``batch_index`` (0-based, in the run's order) is this rank's."""
        return batch_index % self.world_size == self.rank

    def manifest_entry(self) -> dict[str, int]:
        """The ``shard`` key of the shard store's manifest (left out of the merged run's)."""
        return {"rank": self.rank, "world_size": self.world_size}


def _int_env(env: Any, name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer (set by torchrun or "
                               "accelerate launch)") from None  # fmt: skip


def launch(environ: Any | None = None) -> Launch:
    """Rank and world size from the launcher's environment (``torchrun`` and ``accelerate launch``
    both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``); rank 0 of 1
    without them.

    Raises:
        DistributedError: a variable that is not an integer, or a rank outside the world size.
    """
    env = os.environ if environ is None else environ
    world = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", 0)
    local = _int_env(env, "LOCAL_RANK", rank)
    local_world = _int_env(env, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK {rank} is not within WORLD_SIZE {world} (set by torchrun or accelerate launch)")
    if not 0 <= local < max(1, local_world):
        raise DistributedError(f"LOCAL_RANK {local} is not within LOCAL_WORLD_SIZE {local_world}")
    return Launch(rank, world, local, local_world)


def batch_ranges(n_items: int, batch_size: int) -> list[range]:
    """The batches of a run of ``n_items`` samples: ``range(b·B, min((b+1)·B, n))`` for b = 0, 1, …"""
    if batch_size < 1:
        raise DistributedError(f"batch size must be >= 1, got {batch_size}")
    return [range(start, min(start + batch_size, n_items)) for start in range(0, n_items, batch_size)]


def shard_batches(items: Sequence[T], batch_size: int, rank: int, world_size: int) -> list[T]:
    """The items of the batches that go to ``rank``: batch b (items b·B … (b+1)·B − 1) to rank
    b mod ``world_size``, in order. Re-batching the result by ``batch_size`` gives exactly those
    batches (only the run's last batch may be short, and it comes last)."""
    return [items[i] for b, batch in enumerate(batch_ranges(len(items), batch_size)) if b % world_size == rank
            for i in batch]  # fmt: skip


def shards_root(out: str | Path) -> Path:
    """The directory of a run's shard stores: ``OUT.shards`` beside ``OUT``."""
    out = Path(out)
    return out.parent / f"{out.name}{SHARDS_SUFFIX}"


def shard_dir(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` records: ``OUT.shards/rank-<r>-of-<N>`` (5 digits each)."""
    return shards_root(out) / f"rank-{rank:05d}-of-{world_size:05d}"


def existing_world_sizes(out: str | Path) -> set[int]:
    """World sizes of the shard stores under ``OUT.shards`` (empty when there are none)."""
    root = shards_root(out)
    if not root.is_dir():
        return set()
    sizes = set()
    for entry in root.iterdir():
        head, sep, tail = entry.name.rpartition("-of-")
        if entry.is_dir() and sep and head.startswith("rank-") and tail.isdigit():
            sizes.add(int(tail))
    return sizes


def check_world_size(out: str | Path, world_size: int) -> None:
    """Refuse, before anything is written, a launch (or a single process, world size 1) whose
    world size differs from that of an unfinished sharded run of ``out``.

    Raises:
        DistributedError: one line naming ``OUT.shards``, both sizes and the two ways out.
    """
    other = sorted(existing_world_sizes(out) - {world_size})
    if other:
        root = shards_root(out)
        raise DistributedError(f"{root}: holds the unfinished shards of a run launched with {other[0]} processes, "
                               f"not {world_size}; rerun with torchrun --nproc-per-node {other[0]} (accelerate "
                               f"launch --num_processes {other[0]}) to finish it, or remove {root} to start those "
                               "samples over")  # fmt: skip


_GROUP: dict[str, Any] = {}  # the process group this module started, if any


def _process_group() -> Any:
    """``torch.distributed`` with a ``gloo`` group (started here if the launcher gave an address
    and none is running), or None without one."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        timeout = float(os.environ.get("VPSTUDY_BARRIER_TIMEOUT_S", BARRIER_TIMEOUT_S))
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        _GROUP["dist"] = dist
        atexit.register(_destroy_group)
    return dist


def _destroy_group() -> None:
    dist = _GROUP.pop("dist", None)
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    dist = _process_group()
    if dist is not None:
        dist.barrier()


def wait_for_shards(out: str | Path, world_size: int, *, timeout_s: float = BARRIER_TIMEOUT_S,
                    poll_s: float = 1.0) -> None:  # fmt: skip
    """Block until every rank's shard of ``out`` is marked finished (used without a process group)."""
    marks = [shard_dir(out, r, world_size) / DONE for r in range(world_size)]
    start = time.monotonic()
    while not all(m.is_file() for m in marks):
        if time.monotonic() - start > timeout_s:
            missing = [m.parent.name for m in marks if not m.is_file()]
            raise DistributedError(f"{out}: shards {', '.join(missing)} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)


def missing_samples(out: str | Path, ids: Sequence[str], batch_size: int, world_size: int,
                    skip: frozenset[str]) -> dict[int, list[str]]:  # fmt: skip
    """Per rank, the samples its shard should hold (its batches of ``ids``, less ``skip``) but does not."""
    missing = {}
    for rank in range(world_size):
        expected = [i for i in shard_batches(list(ids), batch_size, rank, world_size) if i not in skip]
        held = set(committed_ids(shard_dir(out, rank, world_size)))
        lacking = [i for i in expected if i not in held]
        if lacking:
            missing[rank] = lacking
    return missing


def run_sharded(out: str | Path, info: Launch, ids: Sequence[str], batch_size: int,
                record: Callable[[Shard], Any], merge: Callable[[list[Path]], T]) -> T:  # fmt: skip
    """Record this rank's shard of a run with ``record(shard)``, wait for every rank, merge on
    rank 0 with ``merge(shard_paths)`` (then remove ``OUT.shards``), wait again, and return
    ``merge``'s result on rank 0; on the other ranks, ``merge`` is not called and None is
    returned once the merged run is on disk.

    Args:
        out: the merged run directory.
        info: this process's place in the launch (world size > 1).
        ids: every sample id of the run, in the single-process order.
        batch_size: samples per batch (batch b goes to rank b mod N).
        record: records the shard's batches into ``shard.path`` (skipping ``shard.skip``).
        merge: joins the shard stores (in rank order) into ``out``.

    Raises:
        DistributedError: another world size's shards exist (before anything is written), or a
            shard lacks samples after every rank finished (nothing is merged).
    """
    check_world_size(out, info.world_size)
    skip = frozenset(committed_ids(out))  # read before any rank can merge (after the first barrier)
    shard = Shard(info.rank, info.world_size, Path(out), shard_dir(out, info.rank, info.world_size), skip)
    (shard.path / DONE).unlink(missing_ok=True)
    record(shard)
    (shard.path / DONE).write_text("finished\n", encoding="utf-8")
    dist = _process_group()
    if dist is not None:
        dist.barrier()
    elif info.main:  # without a process group only rank 0 waits for the shards; the others wait for its merge
        wait_for_shards(out, info.world_size)
    result = None
    if info.main:
        lacking = missing_samples(out, ids, batch_size, info.world_size, skip)
        if lacking:
            rank, which = next(iter(lacking.items()))
            raise DistributedError(f"{shard_dir(out, rank, info.world_size)}: lacks {len(which)} of its samples "
                                   f"({which[0]!r} first) after every rank finished; rerun the same "
                                   "command")  # fmt: skip
        paths = [shard_dir(out, r, info.world_size) for r in range(info.world_size)]
        result = merge(paths)
        held = set(committed_ids(out))
        if all(i in held for i in ids):
            shutil.rmtree(shards_root(out), ignore_errors=True)
    if dist is not None:
        dist.barrier()  # the merge is on disk before any rank goes on
    elif not info.main:
        wait_for_merge(out, ids)
    return result  # type: ignore[return-value]


def wait_for_merge(out: str | Path, ids: Sequence[str], *, timeout_s: float = BARRIER_TIMEOUT_S,
                   poll_s: float = 1.0) -> None:  # fmt: skip
    """Block until the run ``out`` holds every sample of ``ids`` (rank 0's merge, without a process group)."""
    start = time.monotonic()
    while not set(ids) <= set(committed_ids(out)):
        if time.monotonic() - start > timeout_s:
            raise DistributedError(f"{out}: rank 0 did not merge the shards within {timeout_s:.0f} s")
        time.sleep(poll_s)
