"""The benchmark adapter contract, the registry, and what every adapter shares.

A :class:`Benchmark` turns one record of a benchmark's dataset (its columns as on the Hugging
Face Hub) into a :class:`BenchmarkExample`: an id, the image, the prompt text built as lmms-eval
or VLMEvalKit build it for that task, the reference answer(s) and options. It names the scorer
of the benchmark and, for benchmarks an LLM judge scores, writes the predictions in the format
the judge reads. Adapters register themselves with :func:`register`; each lives in its own
module of this package, which imports every module it holds, so a new benchmark is one new file.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..datasets import DatasetError, Example, _image_ref
from ..errors import VpstudyError
from ..scoring import Scorer, answer_text

if TYPE_CHECKING:
    from ..runs import Run

JUDGE_DIR = "judge"  # where a run keeps the predictions exported for an LLM judge


class BenchmarkError(DatasetError):
    """An unknown benchmark, a dataset that lacks a field its adapter reads, or a hub dataset
    that cannot be fetched (one-line message)."""


@dataclass
class BenchmarkExample(Example):
    """An :class:`~vpstudy.datasets.Example` from a benchmark adapter.

    ``question`` is the full prompt text (the benchmark's instructions included); ``answer`` is
    the first reference answer and ``answers`` all of them (TextVQA's ten human answers,
    DocVQA's variants); ``benchmark`` is the adapter's registry name. ``extra`` holds the
    record's other columns (the raw question among them), images excluded."""

    benchmark: str = ""
    answers: list[str] | None = None


class Benchmark(ABC):
    """One benchmark's adapter (subclass it, set the class attributes, register it).

    Class attributes:
        name: registry name, lower case (``--benchmark NAME``).
        title: the benchmark's usual name.
        hub_ids: Hugging Face dataset ids this adapter reads, as ``"org/name"`` or, where one
            repository holds several benchmarks as configs, ``"org/name:config"``.
        default_split: the split read when a hub id names none.
        signature: columns that identify the benchmark in a local copy (empty: recognised only
            by hub id or ``--benchmark``).
        required: columns the adapter reads; a dataset without one of them is refused.
        image_columns: columns that may hold the image, the first present and non-null is used.
        scorer: the benchmark's scorer.
        sources: where the schema, prompt and scoring were read (documentation).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    hub_ids: ClassVar[tuple[str, ...]] = ()
    default_split: ClassVar[str | None] = None
    signature: ClassVar[frozenset[str]] = frozenset()
    required: ClassVar[tuple[str, ...]] = ()
    image_columns: ClassVar[tuple[str, ...]] = ("image",)
    scorer: ClassVar[Scorer]
    sources: ClassVar[str] = ""

    def __repr__(self) -> str:
        return f"<benchmark {self.name}: {self.title}, scorer {self.scorer.name}>"

    # ------------------------------------------------------------------ what each adapter defines

    @abstractmethod
    def prompt(self, record: Mapping[str, Any]) -> str:
        """The text of the user turn (the image goes before it)."""

    @abstractmethod
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        """The reference answers, or None when the record has none (a test split)."""

    def choices(self, record: Mapping[str, Any]) -> list[str] | None:
        """The options of a multiple-choice record that lists them in a column, else None."""
        return None

    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        """The example's id: the benchmark's question id, or the 0-based row index."""
        return str(index)

    # ------------------------------------------------------------------ shared

    @property
    def judged(self) -> bool:
        """Whether an LLM judge scores this benchmark (vpstudy then computes no score)."""
        return self.scorer.judged

    def check_columns(self, columns: Sequence[str], dataset: str) -> None:
        """Refuse a dataset that lacks a column this adapter reads (one line naming both)."""
        missing = [c for c in self.required if c not in columns]
        if not any(c in columns for c in self.image_columns):
            missing.append(self.image_columns[0])
        if missing:
            raise BenchmarkError(
                f"{dataset}: no column {missing[0]!r}, which the {self.title} adapter reads "
                f"(columns: {', '.join(columns) or 'none'}; --benchmark picks another adapter)"
            )

    def to_example(self, record: Mapping[str, Any], source: str, root: Path, index: int) -> BenchmarkExample:
        """The example of one record (``source`` locates it in error messages)."""
        if not isinstance(record, Mapping):
            raise DatasetError(f"{source}: expected an object, got {type(record).__name__}")
        for column in self.required:
            if column not in record:
                raise BenchmarkError(f"{source}: field {column!r}, which the {self.title} adapter reads, is missing")
        image = next((record[c] for c in self.image_columns if record.get(c) is not None), None)
        if image is None:
            raise BenchmarkError(f"{source}: field {self.image_columns[0]!r} (the image) is missing")
        try:
            answers, prompt, choices = self.answers(record), self.prompt(record), self.choices(record)
            example_id = self.example_id(record, index)
        except VpstudyError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise BenchmarkError(
                f"{source}: a field the {self.title} adapter reads has an unexpected value ({type(e).__name__}: {e})"
            ) from None
        return BenchmarkExample(
            id=example_id,
            question=prompt,
            answer=answers[0] if answers else None,
            choices=choices,
            extra={k: v for k, v in record.items() if k not in self.image_columns},
            source=source,
            image_ref=_image_ref(image, source),
            root=root,
            benchmark=self.name,
            answers=answers,
        )

    def export_for_judge(self, run: Run, examples: Mapping[str, Example]) -> Path | None:
        """For a judged benchmark, write the run's predictions where its judge reads them
        (under ``RUN/judge/``) and return the path; None for a benchmark vpstudy scores."""
        return None


# ---------------------------------------------------------------------------------------------- registry

REGISTRY: dict[str, Benchmark] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: add an adapter to :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"benchmark {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


# ---------------------------------------------------------------------------------------------- field helpers


def text(record: Mapping[str, Any], column: str) -> str:
    """A string column (None reads as the empty string)."""
    value = record.get(column)
    return "" if value is None else str(value)


def string_list(value: Any) -> list[str] | None:
    """A column holding one string or a sequence of them, as a list of strings; None, or an
    empty sequence, reads as None."""
    if value is None:
        return None
    if isinstance(value, str | int | float):
        return [str(value)]
    items = [str(v) for v in value if v is not None]
    return items or None


def answer_list(record: Mapping[str, Any], column: str) -> list[str] | None:
    """The reference answers in ``column``: one string, or a list of them."""
    return string_list(record.get(column))


def write_atomic(path: Path, content: str) -> Path:
    """Write UTF-8 text through a temporary file renamed into place (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(content, encoding="utf-8")
    partial.replace(path)
    return path


def write_json(path: Path, content: Any) -> Path:
    """Write ``content`` as indented UTF-8 JSON, atomically."""
    return write_atomic(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def judged_answers(run: Run) -> dict[str, str]:
    """Each sample's answer as a judge reads it: the text after ``</think>`` (the samples'
    ``answer_text``); the empty string for a trace cut before ``</think>``."""
    samples = run.samples
    answers = {}
    for row in samples.itertuples(index=False):
        if "answer_text" in samples.columns:
            value = row.answer_text
        else:
            value = answer_text(str(row.generated_text))
        answers[str(row.sample_id)] = value if isinstance(value, str) else ""
    return answers
