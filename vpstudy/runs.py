"""Run store: per-sample attention statistics recorded while decoding a VLM.

A run is a directory::

    manifest.json              {"schema_version": 1, ...caller keys}
    samples.parquet/           one part file per sample, one row per sample
    steps.parquet/             one part file per sample, one row per (step, layer)
    arrays/<key>/<name>.npy    per-sample numpy arrays, e.g. ``scores``

Part files are named ``part-<seq>-<key>.parquet`` where ``seq`` is a monotonically
increasing commit number and ``key = sha1(sample_id)[:16]``; the same name is used in
``samples.parquet/`` and ``steps.parquet/``. Both directories can be read directly with
``pd.read_parquet`` (temporary files start with ``.`` and are skipped), but only
:func:`open_run` hides the leftovers of a sample that was interrupted mid-write.

Each sample is committed atomically: its arrays directory, then its steps part and
finally its samples part are written under temporary names and renamed into place. The
samples part is the commit marker, so a process killed at any moment (``kill -9``)
loses at most the in-flight sample, whose leftovers are removed when the run is resumed.
Files are not fsynced: the guarantee covers process crashes, not power loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from .errors import VpstudyError

SCHEMA_VERSION: int = 1

MANIFEST = "manifest.json"
SAMPLES_DIR = "samples.parquet"
STEPS_DIR = "steps.parquet"
ARRAYS_DIR = "arrays"
_TMP = ".tmp-"
_PART_RE = re.compile(r"part-(\d+)-([0-9a-f]{16})\.parquet")
_ARRAY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


class RunStoreError(VpstudyError):
    """A run directory is missing, malformed, incompatible or misused."""


def sample_key(sample_id: str) -> str:
    """Filesystem-safe key of a sample id: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:16]


def _part_name(seq: int, key: str) -> str:
    return f"part-{seq:06d}-{key}.parquet"


def _committed_parts(path: Path) -> list[tuple[int, str]]:
    """(seq, file name) of every committed samples part, in commit order."""
    samples_dir = path / SAMPLES_DIR
    if not samples_dir.is_dir():
        return []
    parts = [(int(m[1]), m[0]) for f in os.listdir(samples_dir) if (m := _PART_RE.fullmatch(f))]
    return sorted(parts)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStoreError(f"{file}: missing; {path} is not a vpstudy run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunStoreError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise RunStoreError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name next to ``target``, then rename it into place."""
    tmp = target.with_name(_TMP + target.name)
    write(tmp)
    os.replace(tmp, target)


def _read_parts(files: Sequence[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenate parquet files; also return the index of the file each row came from."""
    if not files:
        return pd.DataFrame({"sample_id": pd.Series([], dtype=str)}), np.zeros(0, dtype=np.int64)
    try:
        tables = [pq.read_table(f) for f in files]
    except (OSError, pa.ArrowException) as e:
        raise RunStoreError(f"cannot read run part: {e}") from None
    origin = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.to_pandas(), origin


class RunWriter:
    """Creates or resumes a run and commits samples to it one at a time.

    Args:
        path: run directory; created if missing.
        manifest: JSON-serialisable run description; ``schema_version`` is added.
        compare_keys: manifest keys that must match when resuming an existing run.

    Raises:
        RunStoreError: the directory holds something else, an incompatible run, or a run
            recorded with different ``compare_keys`` values. Nothing is changed on error.
    """

    def __init__(
        self, path: str | Path, manifest: dict[str, Any], *, compare_keys: Sequence[str] = ()
    ) -> None:
        self.path = Path(path)
        if manifest.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise RunStoreError(f"{self.path}: manifest schema_version must be {SCHEMA_VERSION}")
        try:
            text = json.dumps({**manifest, "schema_version": SCHEMA_VERSION}, indent=2)
        except (TypeError, ValueError) as e:
            raise RunStoreError(f"{self.path}: manifest is not JSON-serialisable ({e})") from None
        requested = json.loads(text)

        if self.path.exists() and not self.path.is_dir():
            raise RunStoreError(f"{self.path}: exists and is not a directory")
        if (self.path / MANIFEST).exists():
            self.manifest = _read_manifest(self.path)
            self._check_compatible(requested, compare_keys)
            self._clean_leftovers()
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise RunStoreError(f"{self.path}: directory exists and is not a vpstudy run")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(text + "\n", "utf-8"))
            self.manifest = requested
        for sub in (SAMPLES_DIR, STEPS_DIR, ARRAYS_DIR):
            (self.path / sub).mkdir(exist_ok=True)

        parts = _committed_parts(self.path)
        self._next_seq = parts[-1][0] + 1 if parts else 0
        self._parts: dict[str, str] = {}  # sample_id -> part file name
        for _, name in parts:
            ids = pq.read_table(self.path / SAMPLES_DIR / name, columns=["sample_id"])
            self._parts[ids.column("sample_id")[0].as_py()] = name

    def _check_compatible(self, requested: dict[str, Any], compare_keys: Sequence[str]) -> None:
        stored_version = self.manifest.get("schema_version")
        if stored_version != SCHEMA_VERSION:
            raise RunStoreError(
                f"{self.path / MANIFEST}: schema version {stored_version}, this vpstudy writes "
                f"{SCHEMA_VERSION}; use a new --out directory"
            )
        diffs = [
            f"{k} (stored {json.dumps(self.manifest.get(k))}, requested {json.dumps(requested.get(k))})"
            for k in compare_keys
            if self.manifest.get(k) != requested.get(k)
        ]
        if diffs:
            raise RunStoreError(
                f"{self.path}: existing run was recorded with different {', '.join(diffs)}; "
                "use a new --out directory"
            )

    def _clean_leftovers(self) -> None:
        """Remove temporary files and the parts of samples that were never committed."""
        committed = {name for _, name in _committed_parts(self.path)}
        keys = {m[2] for m in map(_PART_RE.fullmatch, committed) if m}
        leftovers = [e for e in self.path.iterdir() if e.name.startswith(_TMP)]
        for sub, keep in ((SAMPLES_DIR, committed), (STEPS_DIR, committed), (ARRAYS_DIR, keys)):
            if (self.path / sub).is_dir():
                leftovers += [e for e in (self.path / sub).iterdir() if e.name not in keep]
        for entry in leftovers:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    @property
    def next_seq(self) -> int:
        """Commit number the next sample will get (unique within the run, also across resumes)."""
        return self._next_seq

    @property
    def done_ids(self) -> set[str]:
        """Sample ids already committed to this run."""
        return set(self._parts)

    def write_sample(
        self, sample: Mapping[str, Any], steps: pd.DataFrame, arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Commit one sample atomically.

        Args:
            sample: one samples row; must hold a str ``sample_id`` not yet committed.
            steps: rows of this sample, one per (step, layer); its ``sample_id`` column
                must equal ``sample["sample_id"]`` on every row.
            arrays: name -> array saved as ``arrays/<key>/<name>.npy``, e.g. ``scores``
                shaped [steps, layers, N_v]. Names are ``[A-Za-z0-9_-]+``; no object dtypes.
        """
        sample_id = sample.get("sample_id")
        if not isinstance(sample_id, str):
            raise RunStoreError(f"{self.path}: sample_id must be a str, got {sample_id!r}")
        if sample_id in self._parts:
            raise RunStoreError(f"{self.path}: sample {sample_id!r} is already committed")
        if "sample_id" not in steps.columns or not (steps["sample_id"] == sample_id).all():
            raise RunStoreError(
                f"{self.path}: steps of sample {sample_id!r} must have sample_id == {sample_id!r}"
            )
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        for name, a in arrays.items():
            if not _ARRAY_NAME_RE.fullmatch(name) or a.dtype.hasobject:
                raise RunStoreError(
                    f"{self.path}: array {name!r} of sample {sample_id!r} needs a [A-Za-z0-9_-] "
                    f"name and a non-object dtype (got {a.dtype})"
                )

        def save_arrays(dest: Path) -> None:
            for name, a in arrays.items():
                np.save(dest / f"{name}.npy", a, allow_pickle=False)

        self._commit(
            sample_id,
            save_arrays,
            lambda f: pq.write_table(pa.Table.from_pandas(steps, preserve_index=False), f),
            lambda f: pq.write_table(pa.Table.from_pylist([dict(sample)]), f),
        )

    def _commit(
        self,
        sample_id: str,
        fill_arrays: Callable[[Path], object],
        write_steps: Callable[[Path], object],
        write_samples: Callable[[Path], object],
    ) -> None:
        """Write arrays dir, steps part, then samples part (the commit marker), each atomically."""
        key = sample_key(sample_id)
        name = _part_name(self._next_seq, key)
        tmp_dir = Path(tempfile.mkdtemp(prefix=_TMP, dir=self.path / ARRAYS_DIR))
        fill_arrays(tmp_dir)
        os.rename(tmp_dir, self.path / ARRAYS_DIR / key)
        _write_atomic(self.path / STEPS_DIR / name, write_steps)
        _write_atomic(self.path / SAMPLES_DIR / name, write_samples)
        self._parts[sample_id] = name
        self._next_seq += 1

    def close(self) -> None:
        """Nothing to flush: every sample is complete on disk once write_sample returns."""

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class Run:
    """A run's committed content, as read by :func:`open_run`.

    ``samples`` has one row per sample in commit order; ``steps`` has one row per
    (sample, step, layer), sorted by (commit order, step, layer).
    """

    path: Path
    manifest: dict[str, Any]
    samples: pd.DataFrame
    steps: pd.DataFrame
    _ids: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = frozenset(self.samples["sample_id"])

    @property
    def sample_ids(self) -> list[str]:
        """Committed sample ids, in commit order."""
        return list(self.samples["sample_id"])

    def arrays(self, sample_id: str) -> dict[str, np.ndarray]:
        """Read-only memory-mapped arrays of one sample, by name."""
        if sample_id not in self._ids:
            raise RunStoreError(f"{self.path}: no sample {sample_id!r} in this run")
        folder = self.path / ARRAYS_DIR / sample_key(sample_id)
        if not folder.is_dir():
            raise RunStoreError(f"{folder}: arrays of sample {sample_id!r} are missing")
        return {f.stem: np.load(f, mmap_mode="r") for f in sorted(folder.glob("*.npy"))}

    def scores(self, sample_id: str) -> np.ndarray:
        """Attention scores of one sample, shaped [steps, layers, N_v]."""
        arrays = self.arrays(sample_id)
        if "scores" not in arrays:
            raise RunStoreError(f"{self.path}: sample {sample_id!r} has no 'scores' array")
        return arrays["scores"]


def open_run(path: str | Path) -> Run:
    """Read the manifest and committed samples/steps of a run (arrays load lazily)."""
    path = Path(path)
    if not path.is_dir():
        raise RunStoreError(f"{path}: no such run directory")
    manifest = _read_manifest(path)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunStoreError(
            f"{path / MANIFEST}: written by schema version {version}, "
            f"this vpstudy reads {SCHEMA_VERSION}"
        )
    names = [name for _, name in _committed_parts(path)]
    samples, _ = _read_parts([path / SAMPLES_DIR / n for n in names])
    steps, origin = _read_parts([path / STEPS_DIR / n for n in names])
    order = [c for c in ("step", "layer") if c in steps.columns]
    steps = (
        steps.assign(_commit=origin)
        .sort_values(["_commit", *order], kind="stable")
        .drop(columns="_commit")
        .reset_index(drop=True)
    )
    return Run(path, manifest, samples, steps)


def merge_runs(out: str | Path, shards: Sequence[str | Path]) -> Run:
    """Join shard runs (identical manifests apart from a ``shard`` key) into run ``out``.

    Parts and arrays are copied shard by shard, in commit order. A sample id present in
    several shards (or already in ``out``) is kept once if its samples and steps rows are
    identical, and is an error otherwise. Re-running a merge into the same ``out`` resumes.
    """
    if not shards:
        raise RunStoreError(f"{out}: no shard runs to merge")
    runs = [open_run(s) for s in shards]
    manifest = {k: v for k, v in runs[0].manifest.items() if k != "shard"}
    for run in runs[1:]:
        other = {k: v for k, v in run.manifest.items() if k != "shard"}
        if other != manifest:
            keys = sorted(k for k in manifest.keys() | other.keys() if manifest.get(k) != other.get(k))
            raise RunStoreError(
                f"{run.path}: manifest differs from {runs[0].path} in {', '.join(keys)}"
            )
    writer = RunWriter(out, manifest, compare_keys=sorted(manifest))
    for run in runs:
        for _, name in _committed_parts(run.path):
            src_samples, src_steps = run.path / SAMPLES_DIR / name, run.path / STEPS_DIR / name
            sample_id = pq.read_table(src_samples, columns=["sample_id"])["sample_id"][0].as_py()
            if sample_id in writer._parts:
                kept = writer._parts[sample_id]
                same = pq.read_table(src_samples).equals(
                    pq.read_table(writer.path / SAMPLES_DIR / kept)
                ) and pq.read_table(src_steps).equals(pq.read_table(writer.path / STEPS_DIR / kept))
                if not same:
                    raise RunStoreError(
                        f"{run.path}: sample {sample_id!r} conflicts with the copy already in {out}"
                    )
                continue
            src_arrays = run.path / ARRAYS_DIR / sample_key(sample_id)
            writer._commit(
                sample_id,
                lambda d, src=src_arrays: shutil.copytree(src, d, dirs_exist_ok=True),
                lambda f, src=src_steps: shutil.copyfile(src, f),
                lambda f, src=src_samples: shutil.copyfile(src, f),
            )
    return open_run(out)
