"""Datasets from the Hugging Face Hub: ``org/name[:config]:split`` ids for ``--data``.

``datasets.load_dataset`` fetches the split (or reads it from the local cache). Offline
(``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``) only the cache is read, and a dataset that is
not there is one line naming the id and ``HF_HUB_OFFLINE``; so is a hub that cannot be reached.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BenchmarkError

# org/name, then optionally :config and :split (or only :split)
_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<first>[^:/\s]+))?(?::(?P<second>[^:/\s]+))?"
)
_TRUE = {"1", "ON", "YES", "TRUE"}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow")


@dataclass(frozen=True)
class HubSource:
    """A parsed hub id: repository, optional config, optional split, and the text as given;
    once loaded, ``fingerprint`` identifies the whole split (``VisionDataset.source_fingerprint``)."""

    repo: str
    config: str | None
    split: str | None
    text: str
    fingerprint: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """A short dataset name for runs: the repository name, config and split joined by ``-``."""
        return "-".join(p for p in (self.repo.split("/")[-1], self.config, self.split) if p)


def parse_hub_id(text: str) -> HubSource | None:
    """``org/name:split`` or ``org/name:config:split`` (or ``org/name``), else None. A name ending
    in a data file's extension (``data/x.jsonl``) is a local path, not an id."""
    match = _HUB_ID.fullmatch(text.strip())
    if match is None or match["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    first, second = match["first"], match["second"]
    config, split = (first, second) if second is not None else (None, first)
    return HubSource(repo=match["repo"], config=config, split=split, text=text.strip())


def hub_offline() -> bool:
    """Whether the environment asks for offline mode now (read at each call, unlike the
    libraries, which read it once at import)."""
    import datasets

    flags = (
        os.environ.get("HF_HUB_OFFLINE"),
        os.environ.get("HF_DATASETS_OFFLINE"),
        os.environ.get("TRANSFORMERS_OFFLINE"),
    )
    return any((f or "").upper() in _TRUE for f in flags) or bool(datasets.config.HF_HUB_OFFLINE)


def _datasets_cache() -> str:
    """The ``datasets`` cache directory the environment names now."""
    import datasets

    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "datasets")
    return str(datasets.config.HF_DATASETS_CACHE)


@contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` honour offline mode for this call: both read
    ``HF_HUB_OFFLINE`` once, at import, so a later change of the environment would not reach
    them and a download would be tried."""
    import huggingface_hub.constants as hub_constants

    import datasets

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _one_line(error: BaseException) -> str:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_hub_split(source: HubSource, split: str, limit: int | None) -> tuple[Any, dict[str, Any]]:
    """The split as a ``datasets.Dataset`` with every image column left undecoded (bytes and
    path), its first ``limit`` rows (all if None), and the fingerprint of the whole split:
    ``{"sha256": ..., "records": N}`` over the id, config, split and ``datasets``' own
    fingerprint of the split's data, so another ``limit`` of the same split is the same dataset.

    Raises:
        BenchmarkError: offline and not cached, hub unreachable, unknown repository, config or
            split; each in one line naming the id.
    """
    import datasets

    offline = hub_offline()
    try:
        with _offline_mode(offline):
            ds = datasets.load_dataset(source.repo, source.config, split=split, cache_dir=_datasets_cache())
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        if offline:
            raise BenchmarkError(
                f"{source.text}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it is not "
                "downloaded (fetch it once online, or pass a save_to_disk directory or parquet copy)"
            ) from None
        if isinstance(error, ConnectionError) or "connect" in type(error).__name__.lower():
            raise BenchmarkError(
                f"{source.text}: cannot reach the Hugging Face Hub ({_one_line(error)}); with a cached copy set "
                "HF_HUB_OFFLINE=1, or pass a save_to_disk directory or parquet copy"
            ) from None
        raise BenchmarkError(
            f"{source.text}: cannot be loaded from the Hugging Face Hub ({_one_line(error)})"
        ) from None
    identity = f"{source.repo}|{source.config or ''}|{split}|{ds._fingerprint}".encode()
    fingerprint = {"sha256": hashlib.sha256(identity).hexdigest(), "records": len(ds)}
    return undecoded_images(ds if limit is None else ds.select(range(min(limit, len(ds))))), fingerprint


def undecoded_images(ds: Any) -> Any:
    """``ds`` with every ``Image`` column cast to ``Image(decode=False)`` (bytes and path)."""
    import datasets

    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds
