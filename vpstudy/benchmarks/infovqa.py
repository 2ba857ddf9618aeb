r"""InfographicVQA (Mathew et al. 2022): questions about infographics, scored by ANLS.

Schema (the ``lmms-lab/DocVQA`` dataset card, config ``InfographicVQA``; ``lmms-lab-encoder/DocVQA``
is the same): ``questionId`` string, ``question`` string, ``answers`` sequence of string,
``answer_type`` sequence of string, ``image`` Image, ``image_url`` string,
``operation/reasoning`` sequence of string, ``ocr`` string, ``data_split`` string; splits
``validation`` (2,801) and ``test`` (answers withheld).

Prompt: lmms-eval ``tasks/infovqa`` (``infovqa_doc_to_text``, default kwargs) and VLMEvalKit's
InfoVQA_VAL agree: the question, then ``"\nAnswer the question using a single word or phrase."``.

Scorer: :class:`~vpstudy.scoring.ANLS` (threshold 0.5) over the answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import ANLS
from .base import Benchmark, answer_list, register, text
from .docvqa import SHORT_ANSWER


@register
class InfoVQA(Benchmark):
    """InfographicVQA, ``validation`` split: the question with the short-answer instruction, ANLS."""

    name = "infovqa"
    title = "InfographicVQA"
    hub_ids = ("lmms-lab/DocVQA:InfographicVQA", "lmms-lab-encoder/DocVQA:InfographicVQA")
    default_split = "validation"
    signature = frozenset({"questionId", "answer_type", "operation/reasoning", "answers"})
    required = ("questionId", "question", "answers")
    scorer = ANLS()
    sources = "lmms-eval tasks/infovqa/utils.py, _default_template_infovqa_yaml; VLMEvalKit image_vqa.py"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return text(record, "question") + SHORT_ANSWER

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answers")

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "questionId")
