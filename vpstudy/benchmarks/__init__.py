"""Benchmark datasets: adapters that read a benchmark's own schema, prompt and score it as the
field's toolkits do (lmms-eval, VLMEvalKit), and export what an LLM judge must score.

``vpstudy.datasets.load_dataset`` (and ``--data``) takes a Hugging Face id
(``lmms-lab/ChartQA:test``, ``lmms-lab/DocVQA:InfographicVQA:validation``), a ``save_to_disk``
directory or a parquet copy of one. The adapter is the one named (``benchmark=``,
``--benchmark NAME``), else the one whose hub id it is, else the one whose columns a local copy
has (a file with vpstudy's own ``id``, ``image`` and ``question`` columns is read as vpstudy's
format). Each adapter is one module of
this package, registered with :func:`~vpstudy.benchmarks.base.register`; the package imports
every module it holds, so adding a benchmark is adding a file.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..scoring import Scorer
from .base import JUDGE_DIR, REGISTRY, Benchmark, BenchmarkError, BenchmarkExample, register
from .hub import HubSource, hub_offline, load_hub_split, parse_hub_id

if TYPE_CHECKING:
    from ..datasets import Example
    from ..runs import Run

_SHARED = {"base", "hub"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

# vpstudy's own format: a record with these is read as such unless a benchmark is named
GENERIC_COLUMNS = ("id", "image", "question")

__all__ = [
    "JUDGE_DIR",
    "REGISTRY",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkExample",
    "HubSource",
    "adapter_for",
    "benchmark_scorer",
    "export_for_judge",
    "get_benchmark",
    "hub_offline",
    "hub_records",
    "judge_status",
    "parse_hub_id",
    "register",
    "select_adapter",
]


def get_benchmark(name: str) -> Benchmark:
    """The adapter registered as ``name`` (case-insensitive)."""
    adapter = REGISTRY.get(name.strip().lower())
    if adapter is None:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return adapter


def _by_hub_id(source: HubSource) -> Benchmark | None:
    """The adapter whose ``hub_ids`` hold this repository: any config of an ``org/name`` entry,
    the named config of an ``org/name:config`` entry."""
    repo, config = source.repo.lower(), (source.config or "").lower()
    for adapter in REGISTRY.values():
        for hub_id in adapter.hub_ids:
            their_repo, _, their_config = hub_id.lower().partition(":")
            if their_repo == repo and (not their_config or their_config == config):
                return adapter
    return None


def _by_columns(columns: Sequence[str], dataset: str) -> Benchmark | None:
    """The adapter whose signature columns the dataset has (the one with the most, if several)."""
    have = set(columns)
    matches = sorted(
        (a for a in REGISTRY.values() if a.signature and a.signature <= have),
        key=lambda a: len(a.signature),
        reverse=True,
    )
    if len(matches) > 1 and len(matches[0].signature) == len(matches[1].signature):
        names = ", ".join(a.name for a in matches)
        raise BenchmarkError(f"{dataset}: its columns fit several benchmarks ({names}); pass --benchmark NAME")
    return matches[0] if matches else None


def adapter_for(
    columns: Sequence[str] | None, dataset: str, *, benchmark: str | None = None, hub: HubSource | None = None
) -> Benchmark | None:
    """The adapter that reads a dataset with these columns, or None for vpstudy's own format.

    Args:
        columns: the dataset's columns (or the first record's keys); None when unknown (empty).
        dataset: how to name the dataset in errors.
        benchmark: an adapter named by the user (``--benchmark``); it must fit the columns.
        hub: the hub id the dataset came from.

    Raises:
        BenchmarkError: an unknown benchmark, a dataset without a column the adapter reads, or
            columns that fit several adapters equally.
    """
    columns = list(columns or [])
    if benchmark is not None:
        adapter: Benchmark | None = get_benchmark(benchmark)
    else:
        adapter = _by_hub_id(hub) if hub is not None else None
        if adapter is None and columns and all(c in columns for c in GENERIC_COLUMNS):
            return None
        if adapter is None and columns:
            adapter = _by_columns(columns, dataset)
    if adapter is not None and columns:
        adapter.check_columns(columns, dataset)
    return adapter


def hub_records(
    source: HubSource, *, limit: int | None = None, benchmark: str | None = None
) -> tuple[HubSource, Iterator[tuple[str, dict[str, Any]]]]:
    """The records of a hub split (first ``limit`` rows), each with where it is
    (``org/name[:config]:split:row N``), and the id with its split resolved (the one given, or
    the default split of the benchmark named or whose id it is) and its ``fingerprint``."""
    adapter = get_benchmark(benchmark) if benchmark is not None else _by_hub_id(source)
    split = source.split or (adapter.default_split if adapter is not None else None)
    if split is None:
        raise BenchmarkError(f"{source.text}: name the split, as {source.repo}:SPLIT (or {source.repo}:CONFIG:SPLIT)")
    ds, fingerprint = load_hub_split(source, split, limit)
    resolved = HubSource(source.repo, source.config, split, source.text, fingerprint)
    label = f"{source.repo}{':' + source.config if source.config else ''}:{split}"
    return resolved, ((f"{label}:row {i}", record) for i, record in enumerate(ds))


def select_adapter(
    records: Iterable[tuple[str, Any]], dataset: str, *, benchmark: str | None = None, hub: HubSource | None = None
) -> tuple[Iterator[tuple[str, Any]], Benchmark | None]:
    """The adapter for a stream of ``(source, record)`` pairs (:func:`adapter_for` on the first
    record's keys) and the same stream, the first record put back."""
    stream = iter(records)
    first = next(stream, None)
    columns = list(first[1]) if first is not None and isinstance(first[1], Mapping) else None
    adapter = adapter_for(columns, dataset, benchmark=benchmark, hub=hub)
    return (itertools.chain([first], stream) if first is not None else stream), adapter


def benchmark_scorer(dataset: Any) -> Scorer | None:
    """The scorer of the dataset's benchmark, or None for a dataset no adapter read."""
    adapter = getattr(dataset, "benchmark", None)
    return adapter.scorer if adapter is not None else None


def export_for_judge(dataset: Any, run: Run) -> Path | None:
    """When an LLM judge scores the dataset's benchmark, write the run's predictions in the
    judge's format under ``RUN/judge/`` and return the file; else None."""
    adapter = getattr(dataset, "benchmark", None)
    if adapter is None or not adapter.judged:
        return None
    examples: Mapping[str, Example] = {example.id: example for example in dataset}
    return adapter.export_for_judge(run, examples)


def judge_status(run: Run) -> str | None:
    """For a run scored by :class:`~vpstudy.scoring.LLMJudge`: one line saying that a judge is
    needed and where the exported predictions are; None for a run vpstudy scored."""
    from ..scoring import SCORERS

    scorer = SCORERS.get(str(run.manifest.get("scorer", "exact_match")))
    if scorer is None or not scorer.judged:
        return None
    exported = sorted(p.name for p in (Path(run.path) / JUDGE_DIR).glob("*") if not p.name.endswith(".partial"))
    where = f"; predictions for the judge: {', '.join(f'{JUDGE_DIR}/{n}' for n in exported)}" if exported else ""
    return f"judge needed: an LLM judge scores this benchmark and vpstudy reports no score{where}"
