r"""TextVQA (Singh et al. 2019): questions that need the text in a photo, scored by VQA accuracy.

Schema (the ``lmms-lab/textvqa`` dataset card, ``dataset_info``; ``lmms-lab-encoder/textvqa`` is
the same): ``image_id`` string, ``question_id`` int32, ``question`` string, ``question_tokens``
sequence of string, ``image`` Image, ``image_width`` and ``image_height`` int32,
``flickr_original_url`` and ``flickr_300k_url`` string, ``answers`` sequence of string (ten
human answers), ``image_classes`` sequence of string, ``set_name`` string, ``ocr_tokens``
sequence of string; splits ``train``, ``validation`` (5,000), ``test`` (answers withheld).

Prompt: lmms-eval ``tasks/textvqa`` (``textvqa_doc_to_text``, default kwargs, no OCR tokens):
``question.capitalize()`` (Python's: first letter upper, the rest lower) then
``"\nAnswer the question using a single word or phrase."`` (VLMEvalKit: the question unchanged,
same suffix).

Scorer: :class:`~vpstudy.scoring.VQAAccuracy` over the ten answers, EvalAI normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import VQAAccuracy
from .base import Benchmark, answer_list, register, text
from .docvqa import SHORT_ANSWER


@register
class TextVQA(Benchmark):
    """TextVQA, ``validation`` split: the capitalised question with the short-answer instruction, VQA accuracy."""

    name = "textvqa"
    title = "TextVQA"
    hub_ids = ("lmms-lab/textvqa", "lmms-lab-encoder/textvqa")
    default_split = "validation"
    signature = frozenset({"question_id", "image_id", "answers", "ocr_tokens"})
    required = ("question_id", "question", "answers")
    scorer = VQAAccuracy()
    sources = "lmms-eval tasks/textvqa/utils.py, _task_utils/vqa_eval_metric.py; VLMEvalKit utils/vqa_eval.py"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return text(record, "question").capitalize() + SHORT_ANSWER

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answers")

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "question_id")
