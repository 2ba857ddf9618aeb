"""MathVista (Lu et al. 2024): mathematical reasoning in visual contexts.

Schema (the ``AI4Math/MathVista`` dataset card, ``dataset_info``): ``pid`` string, ``question``
string, ``image`` string (a relative path), ``decoded_image`` Image, ``choices`` sequence of
string (null for free-form questions), ``unit`` string, ``precision`` float64, ``answer``
string, ``question_type`` string (``multi_choice`` or ``free_form``), ``answer_type`` string
(``text``, ``integer``, ``float``, ``list``), ``metadata`` struct, ``query`` string; splits
``testmini`` (1,000) and ``test`` (answers withheld).

Prompt: lmms-eval ``mathvista_testmini_format`` (``create_one_query`` with ``shot_type:
format-prompt``, zero shots): the question (plus `` (Unit: u)``), the choices as ``A. ...``
lines, then the format hint: "Answer with the option's letter from the given choices directly."
for multiple choice; "Answer the question using a single integer number." / "... a single
floating-point number with one decimal place." / "... two decimal places." / "... a Python
list." by answer type (vpstudy says "N decimal places" for a precision above 2, where
lmms-eval has no hint).

Scorer: :class:`~vpstudy.scoring.MathVistaRule`: the official rule-based extraction and
normalisation (lupantech/MathVista ``evaluation/``), fixed rules where the official code asks an
LLM, then string equality with the answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import MathVistaRule
from .base import Benchmark, register, string_list, text

_DECIMALS = {1: "one decimal place", 2: "two decimal places"}


def format_hint(question_type: str, answer_type: str, precision: int) -> str:
    """lmms-eval's ``format-prompt`` hint for a problem of this type."""
    if question_type == "multi_choice":
        return "Answer with the option's letter from the given choices directly."
    if answer_type == "integer":
        return "Answer the question using a single integer number."
    if answer_type == "float":
        places = _DECIMALS.get(precision, f"{precision} decimal places")
        return f"Answer the question using a single floating-point number with {places}."
    if answer_type == "list":
        return "Answer the question using a Python list."
    return ""


def _precision(record: Mapping[str, Any]) -> int:
    value = record.get("precision")
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


@register
class MathVista(Benchmark):
    """MathVista, ``testmini`` split: lmms-eval's format prompt, the official rule-based scoring."""

    name = "mathvista"
    title = "MathVista"
    hub_ids = ("AI4Math/MathVista",)
    default_split = "testmini"
    signature = frozenset({"pid", "query", "question_type", "answer_type", "decoded_image"})
    required = ("pid", "question", "question_type", "answer_type", "answer")
    image_columns = ("decoded_image", "image")
    scorer = MathVistaRule()
    sources = (
        "lmms-eval tasks/mathvista/mathvista_evals.py (create_one_query) and mathvista_testmini_format.yaml; "
        "lupantech/MathVista evaluation/extract_answer.py, calculate_score.py"
    )

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        question = text(record, "question")
        if unit := text(record, "unit"):
            question += f" (Unit: {unit})"
        choices = self.choices(record) or []
        elements = [
            question,
            "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)),
            format_hint(text(record, "question_type"), text(record, "answer_type"), _precision(record)),
        ]
        return "\n".join(e for e in elements if e).strip()

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        answer = text(record, "answer")
        return [answer] if answer else None

    @override
    def choices(self, record: Mapping[str, Any]) -> list[str] | None:
        return string_list(record.get("choices"))

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "pid")
