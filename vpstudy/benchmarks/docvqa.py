r"""DocVQA (Mathew et al. 2021): questions about scanned documents, scored by ANLS.

Schema (the ``lmms-lab/DocVQA`` dataset card, config ``DocVQA``; ``lmms-lab-encoder/DocVQA`` is
the same): ``questionId`` string, ``question`` string, ``question_types`` sequence of string,
``image`` Image, ``docId`` int64, ``ucsf_document_id`` string, ``ucsf_document_page_no`` string,
``answers`` sequence of string, ``data_split`` string; splits ``validation`` (5,349) and
``test`` (answers withheld).

Prompt: lmms-eval ``tasks/docvqa`` (``docvqa_doc_to_text``, default kwargs) and VLMEvalKit's
``ImageVQADataset.build_prompt`` agree: the question, then
``"\nAnswer the question using a single word or phrase."``.

Scorer: :class:`~vpstudy.scoring.ANLS` (threshold 0.5) over the answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import ANLS
from .base import Benchmark, answer_list, register, text

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@register
class DocVQA(Benchmark):
    """DocVQA, ``validation`` split: the question with the short-answer instruction, ANLS."""

    name = "docvqa"
    title = "DocVQA"
    hub_ids = ("lmms-lab/DocVQA:DocVQA", "lmms-lab-encoder/DocVQA:DocVQA")
    default_split = "validation"
    signature = frozenset({"questionId", "question_types", "docId", "answers"})
    required = ("questionId", "question", "answers")
    scorer = ANLS()
    sources = "lmms-eval tasks/docvqa/utils.py, _default_template_docvqa_yaml, api/metrics.py anls; VLMEvalKit"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return text(record, "question") + SHORT_ANSWER

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answers")

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "questionId")
