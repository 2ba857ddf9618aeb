"""Run store: per-sample attention statistics recorded while decoding a VLM.

A run is a directory::

    manifest.json              {"schema_version": 1, ...caller keys}
    samples.parquet/           one part file per sample, one row per sample
    steps.parquet/             one part file per sample, one row per (step, layer)
    arrays/<key>/<name>.npy    per-sample numpy arrays, e.g. ``scores``

Part files are named ``part-<seq>-<key>.parquet`` where ``seq`` is a monotonically
increasing commit number and ``key = sha1(sample_id)[:16]``; the same name is used in
``samples.parquet/`` and ``steps.parquet/``. Both directories can be read directly with
``pd.read_parquet``: files that are not (yet) part of a committed sample have names starting
with ``.``, which pandas and pyarrow skip.

Each sample is committed in this order (a process killed at any point, ``kill -9`` included,
loses at most the sample in flight):

1. its arrays are written into ``arrays/.tmp-*`` and the directory is renamed ``arrays/<key>``;
2. its steps part is written as ``steps.parquet/.tmp-<name>`` and renamed to the hidden
   ``steps.parquet/.pending-<name>`` (complete, but not part of the run yet);
3. its samples part is written as ``samples.parquet/.tmp-<name>`` and renamed to
   ``samples.parquet/<name>``: **the commit**;
4. the pending steps part is renamed to ``steps.parquet/<name>``.

Arrays that grow while a sample is produced (its p̄, chunk by chunk) are written before step 1
into a hidden arrays directory (:meth:`RunWriter.stage`, :class:`ArrayAppender`: one ``.npy``
appended chunk by chunk, its header finished when the sample is committed), which step 1 then
renames like any other.

So a visible steps part never lacks its samples row. A kill between 3 and 4 leaves a committed
sample whose steps part is still pending: :func:`open_run` reads it from there, and the next
:class:`RunWriter` on the run (a resume) finishes the rename. Everything else a kill leaves
(temporary files, pending parts and arrays of uncommitted samples) is invisible to pandas and
removed on resume. Files are not fsynced: the guarantee covers process crashes, not power loss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import struct
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
from .storage import NPY_HEADER_BYTES, store_entry

SCHEMA_VERSION: int = 1

MANIFEST = "manifest.json"
SAMPLES_DIR = "samples.parquet"
STEPS_DIR = "steps.parquet"
ARRAYS_DIR = "arrays"
_TMP = ".tmp-"
_PENDING = ".pending-"
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


def _rename(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst`` (the one place the store renames: tests simulate kills here)."""
    os.replace(src, dst)


def _write_table(table: pa.Table, file: Path) -> None:
    """Write one parquet part (the one place the store writes parquet: tests simulate a full disk here)."""
    pq.write_table(table, file)


def _write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name next to ``target``, then rename it into place."""
    tmp = target.with_name(_TMP + target.name)
    write(tmp)
    _rename(tmp, target)


def _remove(entry: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _steps_file(path: Path, name: str) -> Path:
    """The steps part of committed part ``name``: visible, or still pending after an interrupted commit."""
    visible = path / STEPS_DIR / name
    if visible.is_file():
        return visible
    pending = path / STEPS_DIR / (_PENDING + name)
    if pending.is_file():
        return pending
    return visible  # renamed by a writer in between, or missing (then reading it names the file)


def committed_count(path: str | Path) -> int:
    """Samples committed to the run at ``path`` (0 if it is not a run): a directory listing, no reads."""
    return len(_committed_parts(Path(path)))


def committed_ids(path: str | Path) -> list[str]:
    """Sample ids committed to the run at ``path``, in commit order (empty if it is not a run):
    the ``sample_id`` column of each samples part, nothing else is read."""
    path = Path(path)
    ids = []
    for _, name in _committed_parts(path):
        try:
            table = pq.read_table(path / SAMPLES_DIR / name, columns=["sample_id"])
        except (OSError, pa.ArrowException) as e:
            raise RunStoreError(f"{path / SAMPLES_DIR / name}: cannot be read ({e})") from None
        ids.append(table.column("sample_id")[0].as_py())
    return ids


def peek_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the run at ``path``, or None if there is none or it cannot be read
    (:class:`RunWriter` and :func:`open_run` report those cases)."""
    try:
        return _read_manifest(Path(path))
    except RunStoreError:
        return None


def check_output_path(path: str | Path, *, option: str = "--out", kind: str = "directory", run: bool = False) -> None:
    """Refuse, in one line and before anything is written, an output ``path`` that cannot be created
    or written: one that exists as the other kind (a file where a directory is wanted, or the
    reverse), one below an existing file, one whose nearest existing directory (or the run
    directory itself) is not writable (permissions, a read-only file system), or (with ``run``)
    a non-empty directory that is not a run.

    Args:
        path: the output to be created or resumed.
        option: the command-line option that named it (for the message).
        kind: ``"directory"`` (a run, a figures folder) or ``"file"`` (a rule JSON).
        run: the directory is, or will become, a run (what :class:`RunWriter` accepts).
    """
    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise RunStoreError(f"{option} {path}: exists and is not a directory; choose another {option}")
    if kind == "file" and path.is_dir():
        raise RunStoreError(f"{option} {path}: is a directory, not a file; choose another {option}")
    existing = path.absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() and existing != path.absolute():
        raise RunStoreError(f"{option} {path}: cannot be created because {existing} is a file, not a directory; "
                            f"choose another {option}")  # fmt: skip
    if run and path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
        raise RunStoreError(f"{option} {path}: directory exists and is not a vpstudy run; choose another {option}")
    writable = [existing if existing.is_dir() else existing.parent]
    if kind == "directory" and path.is_dir():
        writable += [path / sub for sub in (SAMPLES_DIR, STEPS_DIR, ARRAYS_DIR) if (path / sub).is_dir()]
    for folder in writable:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RunStoreError(f"{option} {path}: {folder} is not writable (permission denied or a read-only file "
                                f"system); choose another {option} or change its permissions")  # fmt: skip


def _read_part(file: Path) -> pa.Table:
    """One parquet part; a pending steps part that a writer unhid meanwhile is read under its new name."""
    try:
        return pq.read_table(file)
    except FileNotFoundError:
        if not file.name.startswith(_PENDING):
            raise
        return pq.read_table(file.with_name(file.name[len(_PENDING) :]))


def _read_parts(files: Sequence[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenate parquet files; also return the index of the file each row came from."""
    if not files:
        return pd.DataFrame({"sample_id": pd.Series([], dtype=str)}), np.zeros(0, dtype=np.int64)
    try:
        tables = [_read_part(f) for f in files]
    except (OSError, pa.ArrowException) as e:
        raise RunStoreError(f"cannot read run part: {e}") from None
    origin = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.to_pandas(), origin


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`~vpstudy.storage.NPY_HEADER_BYTES` bytes
    (padded with spaces, as numpy pads its own), so that it can be rewritten in place."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    length = NPY_HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    text = body.encode("latin1")
    if len(text) + 1 > length:
        raise RunStoreError(f"array shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length) + text + b" " * (length - len(text) - 1) + b"\n"


class ArrayAppender:
    """A ``.npy`` file written along its first axis, chunk by chunk, never held in memory whole.

    The file starts with a header for zero rows; :meth:`append` writes each chunk's bytes after
    what is there, and :meth:`close` rewrites the header with the number of rows written.
    ``np.load(path, mmap_mode="r")`` then reads it like any ``.npy``.

    Args:
        path: the file (created).
        dtype: element type of every chunk.
        trailing: shape of one row (the dimensions after the first).
    """

    def __init__(self, path: str | Path, dtype: np.dtype | type, trailing: tuple[int, ...]) -> None:
        self.path, self.dtype, self.trailing = Path(path), np.dtype(dtype), tuple(int(d) for d in trailing)
        self.rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(_npy_header(self.dtype, (0, *self.trailing)))

    def append(self, chunk: np.ndarray) -> None:
        """Write ``chunk`` [n, *trailing] after the rows already written."""
        chunk = np.asarray(chunk)
        if tuple(chunk.shape[1:]) != self.trailing:
            raise RunStoreError(f"{self.path}: chunk of shape {chunk.shape} does not continue rows of {self.trailing}")
        self._file.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.rows += int(chunk.shape[0])

    def close(self) -> None:
        """Finish the header with the rows written and close the file (idempotent)."""
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.trailing)))
        self._file.close()


class StagedSample:
    """A sample whose arrays are written while it is produced, in a hidden directory of the run's
    ``arrays/`` (:meth:`RunWriter.stage`); :meth:`RunWriter.write_sample` commits them with the
    rest of the sample. Until then nothing of it is visible, and a resume removes it."""

    def __init__(self, sample_id: str, path: Path) -> None:
        self.sample_id, self.path = sample_id, path
        self._appenders: dict[str, ArrayAppender] = {}

    def appender(self, name: str, dtype: np.dtype | type, trailing: tuple[int, ...]) -> ArrayAppender:
        """The chunk-written array ``name`` (``<name>.npy``), created on first use."""
        if name not in self._appenders:
            if not _ARRAY_NAME_RE.fullmatch(name):
                raise RunStoreError(f"array {name!r} of sample {self.sample_id!r} needs a [A-Za-z0-9_-] name")
            self._appenders[name] = ArrayAppender(self.path / f"{name}.npy", dtype, trailing)
        return self._appenders[name]

    @property
    def names(self) -> list[str]:
        """The arrays written so far."""
        return list(self._appenders)

    def close(self) -> None:
        """Finish every array's header."""
        for appender in self._appenders.values():
            appender.close()

    def discard(self) -> None:
        """Remove the staged arrays (a sample that will not be committed)."""
        for appender in self._appenders.values():
            appender._file.close()
        _remove(self.path)


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
        """Repair what an interrupted writer left: finish the commit of a sample whose samples part
        is in place but whose steps part is still pending, then remove temporary files and the
        pending parts and arrays of samples that were never committed."""
        committed = {name for _, name in _committed_parts(self.path)}
        steps_dir = self.path / STEPS_DIR
        for name in committed:
            pending = steps_dir / (_PENDING + name)
            if pending.is_file() and not (steps_dir / name).exists():
                _rename(pending, steps_dir / name)
        keys = {m[2] for m in map(_PART_RE.fullmatch, committed) if m}
        leftovers = [e for e in self.path.iterdir() if e.name.startswith(_TMP)]
        for sub, keep in ((SAMPLES_DIR, committed), (STEPS_DIR, committed), (ARRAYS_DIR, keys)):
            if (self.path / sub).is_dir():
                leftovers += [e for e in (self.path / sub).iterdir() if e.name not in keep]
        for entry in leftovers:
            _remove(entry)

    @property
    def next_seq(self) -> int:
        """Commit number the next sample will get (unique within the run, also across resumes)."""
        return self._next_seq

    @property
    def done_ids(self) -> set[str]:
        """Sample ids already committed to this run."""
        return set(self._parts)

    def stage(self, sample_id: str) -> StagedSample:
        """Start a sample whose arrays are written while it is produced (chunk by chunk, see
        :class:`StagedSample`); commit it with ``write_sample(..., staged=...)``, or discard it."""
        return StagedSample(sample_id, Path(tempfile.mkdtemp(prefix=_TMP, dir=self.path / ARRAYS_DIR)))

    def write_sample(
        self,
        sample: Mapping[str, Any],
        steps: pd.DataFrame,
        arrays: Mapping[str, np.ndarray],
        *,
        staged: StagedSample | None = None,
    ) -> None:
        """Commit one sample atomically.

        Args:
            sample: one samples row; must hold a str ``sample_id`` not yet committed.
            steps: rows of this sample, one per (step, layer); its ``sample_id`` column
                must equal ``sample["sample_id"]`` on every row.
            arrays: name -> array saved as ``arrays/<key>/<name>.npy``, e.g. ``scores``
                shaped [steps, layers, N_v]. Names are ``[A-Za-z0-9_-]+``; no object dtypes.
            staged: the sample's arrays already written chunk by chunk (:meth:`stage`); they are
                committed with ``arrays`` (a name in both is an error). On an error before the
                commit they are removed.
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
        if staged is not None and (staged.sample_id != sample_id or set(staged.names) & set(arrays)):
            raise RunStoreError(f"{self.path}: staged arrays of {staged.sample_id!r} {staged.names} do not go with "
                                f"sample {sample_id!r} and arrays {sorted(arrays)}")  # fmt: skip

        def save_arrays(dest: Path) -> None:
            for name, a in arrays.items():
                np.save(dest / f"{name}.npy", a, allow_pickle=False)

        if staged is not None:
            staged.close()
        self._commit(
            sample_id,
            save_arrays,
            lambda f: _write_table(pa.Table.from_pandas(steps, preserve_index=False), f),
            lambda f: _write_table(pa.Table.from_pylist([dict(sample)]), f),
            staged=staged.path if staged is not None else None,
        )

    def _commit(
        self,
        sample_id: str,
        fill_arrays: Callable[[Path], object],
        write_steps: Callable[[Path], object],
        write_samples: Callable[[Path], object],
        *,
        staged: Path | None = None,
    ) -> None:
        """Write the arrays dir, the pending steps part, the samples part (the commit), then
        unhide the steps part (see the module docstring). If the commit fails before its samples
        part is in place (a full disk, Ctrl-C), this attempt's files are removed; after it, the
        steps part is unhidden (or left for the next resume)."""
        key = sample_key(sample_id)
        name = _part_name(self._next_seq, key)
        arrays_dir = self.path / ARRAYS_DIR / key
        pending = self.path / STEPS_DIR / (_PENDING + name)
        samples_part = self.path / SAMPLES_DIR / name
        ours: list[Path] = [pending.with_name(_TMP + pending.name), pending, samples_part.with_name(_TMP + name)]
        try:
            tmp_dir = staged if staged is not None else Path(tempfile.mkdtemp(prefix=_TMP, dir=self.path / ARRAYS_DIR))
            ours.append(tmp_dir)
            fill_arrays(tmp_dir)
            _rename(tmp_dir, arrays_dir)
            ours.append(arrays_dir)
            _write_atomic(pending, write_steps)
            _write_atomic(samples_part, write_samples)
        except BaseException:
            if samples_part.exists():  # interrupted right after the commit: finish it, then re-raise
                self._finish(sample_id, name)
            else:  # not committed: leave nothing of this attempt behind
                for entry in ours:
                    _remove(entry)
            raise
        self._finish(sample_id, name)

    def _finish(self, sample_id: str, name: str) -> None:
        """Register committed part ``name`` and unhide its steps part (left pending for the next
        resume if even a second rename fails)."""
        self._parts[sample_id] = name
        self._next_seq += 1
        pending, visible = self.path / STEPS_DIR / (_PENDING + name), self.path / STEPS_DIR / name
        try:
            _rename(pending, visible)
        except BaseException:
            if pending.exists():
                try:
                    _rename(pending, visible)
                except OSError:
                    pass
            raise

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

    @property
    def store(self) -> dict[str, Any]:
        """The run's store policy: ``{"policy": "full" | "analysis" | "scalars", "score_layers":
        [...]}`` (:func:`vpstudy.storage.store_entry`; a run without one kept every layer's p̄)."""
        return store_entry(self.manifest)

    @property
    def score_layers(self) -> list[int]:
        """The recorded layers whose p̄ the run keeps per step: the layer axis of :meth:`scores`."""
        layers = self.store["score_layers"]
        if layers is None:  # a run written before store policies, whose manifest lists no layers
            layers = sorted(int(x) for x in self.steps["layer"].unique()) if "layer" in self.steps else []
        return list(layers)

    def scores(self, sample_id: str) -> np.ndarray:
        """p̄ of one sample at the run's score layers (:attr:`score_layers`), shaped
        [steps, score layers, N_v], memory-mapped read-only.

        Raises:
            RunStoreError: the run keeps no p̄ (``--store scalars``) or the sample lacks it.
        """
        arrays = self.arrays(sample_id)
        if "scores" not in arrays:
            if not self.score_layers:
                raise RunStoreError(f"{self.path}: this run keeps no per-step p̄ (--store {self.store['policy']}); "
                                    "record with --store analysis or --store full")  # fmt: skip
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
    steps, origin = _read_parts([_steps_file(path, n) for n in names])
    order = [c for c in ("step", "layer") if c in steps.columns]
    steps = (
        steps.assign(_commit=origin)
        .sort_values(["_commit", *order], kind="stable")
        .drop(columns="_commit")
        .reset_index(drop=True)
    )
    return Run(path, manifest, samples, steps)


# manifest keys that say where and when a run (or a shard of it) was written, not what it holds
PROVENANCE_KEYS = ("shard", "created")


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` as ``dst`` (no second copy on disk; run files are never changed in
    place), or copy it where links cannot be made (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _same_sample(a: tuple[Path, Path], b: tuple[Path, Path]) -> bool:
    """Whether two committed copies of a sample (samples part, steps part) hold the same rows."""
    return pq.read_table(a[0]).equals(pq.read_table(b[0])) and pq.read_table(a[1]).equals(pq.read_table(b[1]))


def merge_runs(out: str | Path, shards: Sequence[str | Path], *, order: Sequence[str] | None = None,
               compare_keys: Sequence[str] | None = None) -> Run:  # fmt: skip
    """Join shard runs (identical manifests apart from :data:`PROVENANCE_KEYS`) into run ``out``.

    Args:
        out: the merged run (created, or resumed: samples it holds are not copied again).
        shards: the shard runs.
        order: sample ids in the order to commit them (e.g. a single process's order); ids it
            does not name follow, shard by shard in commit order. None: shard by shard.
        compare_keys: manifest keys that must match an existing ``out`` (default: every key but
            :data:`PROVENANCE_KEYS`).

    Parts and arrays are hard-linked (copied across file systems). A sample id present in
    several shards (or already in ``out``) is kept once if its samples and steps rows are
    identical, and is an error otherwise; every conflict is found before anything is added.
    The merged manifest is the first shard's without its ``shard`` key. Re-running a merge
    into the same ``out`` resumes.
    """
    if not shards:
        raise RunStoreError(f"{out}: no shard runs to merge")
    runs = [open_run(s) for s in shards]
    manifest = {k: v for k, v in runs[0].manifest.items() if k != "shard"}
    reference = {k: v for k, v in manifest.items() if k not in PROVENANCE_KEYS}
    for run in runs[1:]:
        other = {k: v for k, v in run.manifest.items() if k not in PROVENANCE_KEYS}
        if other != reference:
            keys = sorted(k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k))
            raise RunStoreError(
                f"{run.path}: manifest differs from {runs[0].path} in {', '.join(keys)}"
            )
    sources: dict[str, tuple[Path, Path, Path]] = {}  # sample id -> samples part, steps part, arrays dir
    for run in runs:
        for _, name in _committed_parts(run.path):
            src_samples, src_steps = run.path / SAMPLES_DIR / name, _steps_file(run.path, name)
            sample_id = pq.read_table(src_samples, columns=["sample_id"])["sample_id"][0].as_py()
            if sample_id in sources:
                if not _same_sample(sources[sample_id][:2], (src_samples, src_steps)):
                    raise RunStoreError(f"{run.path}: sample {sample_id!r} conflicts with its copy in another shard")
                continue
            sources[sample_id] = (src_samples, src_steps, run.path / ARRAYS_DIR / sample_key(sample_id))
    keys = sorted(reference) if compare_keys is None else list(compare_keys)
    writer = RunWriter(out, manifest, compare_keys=keys)
    for sample_id, (src_samples, src_steps, _) in sources.items():
        if sample_id in writer._parts:
            kept = writer._parts[sample_id]
            ours = (writer.path / SAMPLES_DIR / kept, _steps_file(writer.path, kept))
            if not _same_sample((src_samples, src_steps), ours):
                raise RunStoreError(f"{src_samples.parent.parent}: sample {sample_id!r} conflicts with the copy "
                                    f"already in {out}")  # fmt: skip
    named = [i for i in dict.fromkeys(order or ()) if i in sources]
    rest = [i for i in sources if i not in set(named)]
    for sample_id in [*named, *rest]:
        if sample_id in writer._parts:
            continue
        src_samples, src_steps, src_arrays = sources[sample_id]
        writer._commit(
            sample_id,
            functools.partial(shutil.copytree, src_arrays, dirs_exist_ok=True, copy_function=_link_or_copy),
            functools.partial(_link_or_copy, src_steps),
            functools.partial(_link_or_copy, src_samples),
        )
    return open_run(out)
