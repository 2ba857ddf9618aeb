"""Read visual question answering datasets from JSONL, Parquet or ``save_to_disk`` dirs.

Each record has ``id`` (any scalar, stored as str), ``image``, ``question`` (str),
optional ``answer`` and ``choices`` (list of str); other fields go to ``Example.extra``.
``image`` is a path relative to the data file's directory, raw bytes, or an
``{"bytes": ..., "path": ...}`` dict (the Hugging Face ``Image`` feature). Images are
only opened when :meth:`Example.image` is called.

A Hugging Face dataset id or a benchmark's own schema is read by the benchmark's adapter
(:mod:`vpstudy.benchmarks`), which builds the prompt and picks the scorer.

Error messages name the record as ``<file>:line N`` (JSONL, 1-based line number) or
``<file>:row N`` (Parquet and ``save_to_disk``, 0-based row index). JSONL files must be UTF-8
(a byte-order mark is allowed).

Images are converted to 8-bit RGB faithfully: 16-bit grayscale (``I;16*``, and ``I`` from a
PNG) is scaled by 255/65535, not clipped; other ``I`` images and float (``F``) images are kept if
their values lie in 0..255, scaled if they lie in 0..65535 (``I``) or 0..1 (``F``), and refused
otherwise, in one line naming the record.

:meth:`VisionDataset.fingerprint` identifies the dataset a run was recorded from (see there).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from .errors import VpstudyError

REQUIRED = ("id", "image", "question")
KNOWN = (*REQUIRED, "answer", "choices")


class DatasetError(VpstudyError):
    """A dataset file or one of its records cannot be used."""


@dataclass
class Example:
    """One question about one image.

    ``image_ref`` is the image path (relative to ``root`` unless absolute) or its
    encoded bytes; ``source`` locates the record, e.g. ``"data/x.jsonl:line 3"``.
    """

    id: str
    question: str
    answer: str | None
    choices: list[str] | None
    extra: dict[str, Any]
    source: str
    image_ref: str | bytes = field(repr=False)
    root: Path = field(repr=False)

    def image(self) -> Image.Image:
        """Open the image now, as an RGB ``PIL.Image`` (H x W x 3 when converted to array)."""
        if isinstance(self.image_ref, bytes):
            what = f"image ({len(self.image_ref)} bytes)"
            file: Path | io.BytesIO = io.BytesIO(self.image_ref)
        else:
            what = f"image {self.image_ref!r}"
            file = self.root / self.image_ref
            if not file.is_file():
                raise DatasetError(f"{self.source}: {what} not found")
        try:
            with Image.open(file) as im:
                return _to_rgb(im, f"{self.source}: {what}")
        except DatasetError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{self.source}: {what} cannot be read as an image ({e})") from None


def _to_rgb(im: Image.Image, where: str) -> Image.Image:
    """``im`` as 8-bit RGB without losing its range (see the module docstring).

    Raises:
        DatasetError: an integer or float image whose values fit no 8- or 16-bit range, or hold NaN.
    """
    mode = im.mode
    if not (mode.startswith("I") or mode == "F"):
        return im.convert("RGB")  # 1, L, P, RGB(A), LA, PA, CMYK, YCbCr...: PIL converts these faithfully
    values = np.asarray(im)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DatasetError(f"{where} has mode {mode} with NaN or infinite values; save it as 8-bit RGB or L")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    sixteen_bit = mode.startswith("I;16") or (mode == "I" and im.format == "PNG")
    if low < 0:
        scale = None
    elif sixteen_bit:
        scale = 255 / 65535
    elif mode == "F" and high <= 1:
        scale = 255.0
    elif high <= 255:
        scale = 1.0
    elif mode == "I" and high <= 65535:
        scale = 255 / 65535
    else:
        scale = None
    if scale is None:
        ranges = "8-bit nor 16-bit nor 0..1" if mode == "F" else "8-bit nor 16-bit"
        raise DatasetError(
            f"{where} has mode {mode} with values in [{low:g}, {high:g}], which fit neither {ranges} "
            "grey levels; save it as 8-bit RGB or L"
        )
    grey = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


class VisionDataset(Sequence[Example]):
    """Examples of one dataset, in file order; ``name`` is the file stem (or directory name)."""

    def __init__(self, path: Path, examples: list[Example]) -> None:
        self.path = path
        self.name = path.name if path.is_dir() else path.stem
        self._examples = examples
        self._fingerprint: dict[str, Any] | None = None
        # what identifies a source that is not a local file (set by its reader): see fingerprint()
        self.source_fingerprint: dict[str, Any] | None = None
        self.benchmark: Any = None  # the vpstudy.benchmarks adapter that read it, if any

    def __len__(self) -> int:
        return len(self._examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        return self._examples[index]

    def __repr__(self) -> str:
        return f"VisionDataset({self.name!r}, {len(self)} examples, path={str(self.path)!r})"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this dataset in a run's manifest: ``{"sha256": ..., "records": N}``.

        The sha256 runs over every record of the source file or directory in order, whatever
        ``limit`` loaded, so a ``--limit`` prefix of a dataset has the fingerprint of the whole
        (and a rerun with another limit resumes). Each record contributes all its fields (``id``,
        ``question``, ``answer``, ``choices``, annotations), with embedded image bytes replaced by
        their sha256 and an image path by the path as written and the file's size in bytes: images
        are not read, so this costs one pass over the data file and a stat per image. A record
        that cannot be parsed contributes its raw line. Where ``path`` is not a local file or
        directory, ``source_fingerprint`` is used if a reader set it (e.g. a hub id, split and
        revision), else the loaded examples are fingerprinted (then a different ``limit`` is a
        different dataset). Computed once per object.
        """
        if self._fingerprint is None and self.source_fingerprint is not None:
            self._fingerprint = dict(self.source_fingerprint)
        if self._fingerprint is None:
            digest, records = hashlib.sha256(), 0
            source = (
                _source_records(self.path) if self.path.exists() else (_example_identity(e) for e in self._examples)
            )
            for item in source:
                digest.update(hashlib.sha256(item).digest())
                records += 1
            self._fingerprint = {"sha256": digest.hexdigest(), "records": records}
        return dict(self._fingerprint)

    def check_images(self) -> None:
        """Raise the first example's "image not found" error, without opening any image (a stat per
        image given by path): cheap enough to run before anything is recorded."""
        for example in self._examples:
            if isinstance(example.image_ref, str) and not (example.root / example.image_ref).is_file():
                raise DatasetError(f"{example.source}: image {example.image_ref!r} not found")


def load_dataset(path: str | Path, *, limit: int | None = None, benchmark: str | None = None) -> VisionDataset:
    """Load and validate the first ``limit`` records (all if None) without opening images.

    ``path`` is a ``.jsonl`` file, a ``.parquet`` file, a directory written by
    ``datasets.Dataset.save_to_disk``, or a Hugging Face dataset id ``org/name[:config]:split``.
    A benchmark's data (named by ``benchmark``, by its hub id, or recognised by its columns) is
    read by that benchmark's adapter (:mod:`vpstudy.benchmarks`), kept as ``dataset.benchmark``.
    """
    from .benchmarks import hub_records, parse_hub_id, select_adapter  # imports this module

    hub = None if Path(path).exists() else parse_hub_id(str(path))
    path = Path(path)
    if limit is not None and limit < 0:
        raise DatasetError(f"{path}: limit must be >= 0, got {limit}")
    records: Iterable[tuple[str, Any]]  # (where the record is, the record)
    if hub is not None:
        hub, records = hub_records(hub, limit=limit, benchmark=benchmark)
    elif not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    elif path.is_dir():
        records = _hf_records(path, limit)
    elif path.suffix == ".jsonl":
        records = islice(_jsonl_records(path), limit)
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot be read as Parquet ({e})") from None
        rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
        records = ((f"{path}:row {i}", r) for i, r in enumerate(rows))
    else:
        raise DatasetError(f"{path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")

    root = (path if path.is_dir() else path.parent).absolute()
    records, adapter = select_adapter(records, str(path), benchmark=benchmark, hub=hub)
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for index, (source, record) in enumerate(records):
        example = adapter.to_example(record, source, root, index) if adapter else _example(record, source, root)
        if example.id in first_seen:
            raise DatasetError(f"{source}: duplicate id {example.id!r} (first at {first_seen[example.id]})")
        first_seen[example.id] = source
        examples.append(example)
    dataset = VisionDataset(path, examples)
    dataset.benchmark = adapter
    if hub is not None:
        dataset.name, dataset.source_fingerprint = hub.name, hub.fingerprint
    return dataset


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield number, raw
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}:line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1}); save the file as UTF-8"
        ) from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for number, raw in _jsonl_lines(path):
        source = f"{path}:line {number}"
        try:
            yield source, json.loads(_decode_line(path, number, raw))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{source}: malformed JSON ({e.msg} at column {e.colno})") from None


def _hf_records(path: Path, limit: int | None) -> Iterable[tuple[str, Any]]:
    import datasets  # heavy; only needed for save_to_disk directories

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: not a directory written by datasets save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(
            f"{path}: holds splits {', '.join(ds)}; pass one split directory, e.g. {path / next(iter(ds))}"
        )
    for column, feature in ds.features.items():  # every image column (MathVista's is decoded_image)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ((f"{path}:row {i}", r) for i, r in enumerate(ds))


def _scalar_str(value: Any, name: str, source: str) -> str:
    if not isinstance(value, (str, int, float)):
        raise DatasetError(f"{source}: field {name!r} must be a scalar, got {type(value).__name__}")
    return str(value)


def _image_ref(value: Any, source: str) -> str | bytes:
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, str)) and value:
        return value
    raise DatasetError(f"{source}: field 'image' must be a path or image bytes, got {value!r:.60}")


def _example(record: Any, source: str, root: Path) -> Example:
    if not isinstance(record, dict):
        raise DatasetError(f"{source}: expected an object, got {type(record).__name__}")
    for name in REQUIRED:
        if record.get(name) is None:
            raise DatasetError(f"{source}: required field {name!r} is missing")
    if not isinstance(record["question"], str):
        raise DatasetError(f"{source}: field 'question' must be a string")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise DatasetError(f"{source}: field 'choices' must be a list, got {type(choices).__name__}")
        choices = [_scalar_str(c, "choices", source) for c in choices]
    answer = record.get("answer")
    return Example(
        id=_scalar_str(record["id"], "id", source),
        question=record["question"],
        answer=None if answer is None else _scalar_str(answer, "answer", source),
        choices=choices,
        extra={k: v for k, v in record.items() if k not in KNOWN},
        source=source,
        image_ref=_image_ref(record["image"], source),
        root=root,
    )


def _identity(value: Any, root: Path, key: str | None = None) -> Any:
    """A record as the fingerprint sees it: every field, with bytes (embedded images) replaced by
    their sha256 and an image path (``image`` or ``path`` field) by ``[path, size in bytes]``."""
    if isinstance(value, bytes | bytearray):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, dict):
        return {str(k): _identity(v, root, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_identity(v, root) for v in value]
    if key in ("image", "path") and isinstance(value, str) and value:
        file = root / value
        return [value, file.stat().st_size if file.is_file() else None]
    return value


def _record_identity(record: Any, root: Path) -> bytes:
    """The bytes one raw record contributes to a fingerprint (see :meth:`VisionDataset.fingerprint`)."""
    return json.dumps(_identity(record, root), sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")


def _example_identity(example: Example) -> bytes:
    record = {
        "id": example.id,
        "question": example.question,
        "answer": example.answer,
        "choices": example.choices,
        "image": example.image_ref,
        **example.extra,
    }
    return _record_identity(record, example.root)


def _source_records(path: Path) -> Iterator[bytes]:
    """The identity of every record of a dataset source, in order (tolerant of malformed records)."""
    root = (path if path.is_dir() else path.parent).absolute()
    if path.is_dir():
        for _, record in _hf_records(path, None):
            yield _record_identity(record, root)
    elif path.suffix == ".parquet":
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            for batch in batches:
                for record in batch.to_pylist():
                    yield _record_identity(record, root)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot be read as Parquet ({e})") from None
    else:
        for number, raw in _jsonl_lines(path):
            try:
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield raw.strip()
                continue
            yield _record_identity(record, root)
