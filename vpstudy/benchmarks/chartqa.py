r"""ChartQA (Masry et al. 2022): questions about charts, scored by relaxed accuracy.

Schema (the ``lmms-lab/ChartQA`` dataset card, ``dataset_info``; ``lmms-lab-encoder/ChartQA``
is the same): ``type`` string (``human_test`` or ``augmented_test``), ``question`` string,
``answer`` string, ``image`` Image; one split, ``test`` (2,500 rows). No id column: the id is
the row index.

Prompt: lmms-eval ``tasks/chartqa`` (``chartqa_doc_to_text``, default kwargs): the question, then
``"\nAnswer the question with a single word."``. (VLMEvalKit's ChartQA_TEST appends
``"\nAnswer the question using a single word or phrase."`` instead.)

Scorer: :class:`~vpstudy.scoring.ChartQARelaxed`, the relaxed correctness lmms-eval and
VLMEvalKit share (5% relative tolerance for numbers, exact lower-cased match otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import ChartQARelaxed
from .base import Benchmark, answer_list, register, text


@register
class ChartQA(Benchmark):
    """ChartQA, ``test`` split: the question with lmms-eval's one-word instruction, relaxed accuracy."""

    name = "chartqa"
    title = "ChartQA"
    hub_ids = ("lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA")
    default_split = "test"
    signature = frozenset({"type", "question", "answer", "image"})
    required = ("question", "answer")
    scorer = ChartQARelaxed()
    sources = "lmms-eval tasks/chartqa/utils.py and chartqa.yaml; VLMEvalKit dataset/utils/vqa_eval.py"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return f"{text(record, 'question')}\nAnswer the question with a single word."

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answer")
