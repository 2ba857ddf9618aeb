"""RealWorldQA (xAI 2024): real-world spatial questions; most multiple choice (A-D), a few open.

Schema (``lmms-lab/RealWorldQA``, as lmms-eval's ``tasks/realworldqa/utils.py`` reads it; the
card of the same data at ``visheratin/realworldqa`` lists ``question`` string, ``answer``
string, ``image`` Image): the question carries its options and instruction ("Please answer
directly with only the letter of the correct option and nothing else."); one split, ``test``
(765 rows). No id column: the id is the row index. The columns are too generic to recognise a
copy by them: name it with ``--benchmark realworldqa`` (a hub id is recognised).

Prompt: lmms-eval ``realworldqa_doc_to_text`` with the default (empty) kwargs: the stripped
question.

Scorer: :class:`~vpstudy.scoring.MCQLetter`: letter extraction over A-D when the answer is a
letter, else the lower-cased answer without a trailing period (lmms-eval
``realworldqa_process_results``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import MCQLetter
from .base import Benchmark, answer_list, register, text


@register
class RealWorldQA(Benchmark):
    """RealWorldQA: the stripped question (it carries its options), letter or exact-answer match."""

    name = "realworldqa"
    title = "RealWorldQA"
    hub_ids = ("lmms-lab/RealWorldQA", "lmms-lab-encoder/RealWorldQA", "xai-org/RealworldQA")
    default_split = "test"
    required = ("question", "answer")
    scorer = MCQLetter(letters="ABCD")
    sources = "lmms-eval tasks/realworldqa/utils.py and realworldqa.yaml; _task_utils/mcq_extract.py"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return text(record, "question").strip()

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answer")
