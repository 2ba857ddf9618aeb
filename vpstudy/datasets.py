"""Read visual question answering datasets from JSONL, Parquet or ``save_to_disk`` dirs.

Each record has ``id`` (any scalar, stored as str), ``image``, ``question`` (str),
optional ``answer`` and ``choices`` (list of str); other fields go to ``Example.extra``.
``image`` is a path relative to the data file's directory, raw bytes, or an
``{"bytes": ..., "path": ...}`` dict (the Hugging Face ``Image`` feature). Images are
only opened when :meth:`Example.image` is called.

Error messages name the record as ``<file>:line N`` (JSONL, 1-based line number) or
``<file>:row N`` (Parquet and ``save_to_disk``, 0-based row index).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, overload

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
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{self.source}: {what} cannot be read as an image ({e})") from None


class VisionDataset(Sequence[Example]):
    """Examples of one dataset, in file order; ``name`` is the file stem (or directory name)."""

    def __init__(self, path: Path, examples: list[Example]) -> None:
        self.path = path
        self.name = path.name if path.is_dir() else path.stem
        self._examples = examples

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


def load_dataset(path: str | Path, *, limit: int | None = None) -> VisionDataset:
    """Load and validate the first ``limit`` records (all if None) without opening images.

    ``path`` is a ``.jsonl`` file, a ``.parquet`` file, or a directory written by
    ``datasets.Dataset.save_to_disk``.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise DatasetError(f"{path}: limit must be >= 0, got {limit}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_dir():
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
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for source, record in records:
        example = _example(record, source, root)
        if example.id in first_seen:
            raise DatasetError(f"{source}: duplicate id {example.id!r} (first at {first_seen[example.id]})")
        first_seen[example.id] = source
        examples.append(example)
    return VisionDataset(path, examples)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:line {number}"
            try:
                yield source, json.loads(line)
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
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
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
