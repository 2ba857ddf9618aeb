r"""MM-Vet (Yu et al. 2024): open-ended questions over integrated capabilities (recognition,
OCR, knowledge, generation, spatial awareness, math), graded by an LLM judge (GPT-4 in the
official evaluator; gpt-4o-mini in the VisionPulse paper's VLMEvalKit runs).

Schema (``lmms-lab/MMVet``, the columns lmms-eval's ``tasks/mmvet/utils.py`` reads):
``question_id`` string (``v1_0``...), ``image`` Image, ``question`` string, ``answer`` string
(with ``<AND>``/``<OR>`` between required elements), ``image_source`` string, ``capability``
string (comma-separated); one split, ``test`` (218 rows).

Prompt: lmms-eval ``tasks/mmvet`` (``doc_to_text``, default kwargs): ``"First please perform
reasoning, and think step by step to provide best answer to the following question: \n\n"``
then the question (VLMEvalKit: the question alone).

Score: none computed here. :meth:`MMVet.export_for_judge` writes ``RUN/judge/mmvet_results.json``,
``{question_id: answer}``: the results file the official MM-Vet evaluator (yuweihao/MM-Vet,
``mm-vet_evaluator.py`` and its online version) grades.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ..scoring import LLMJudge
from .base import JUDGE_DIR, Benchmark, answer_list, judged_answers, register, text, write_json

if TYPE_CHECKING:
    from ..datasets import Example
    from ..runs import Run

PRE_PROMPT = (
    "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"
)


@register
class MMVet(Benchmark):
    """MM-Vet: lmms-eval's step-by-step pre-prompt, then the question; judged outside vpstudy."""

    name = "mmvet"
    title = "MM-Vet"
    hub_ids = ("lmms-lab/MMVet", "lmms-lab-encoder/MMVet")
    default_split = "test"
    signature = frozenset({"question_id", "question", "answer", "capability"})
    required = ("question_id", "question", "answer")
    scorer = LLMJudge()
    sources = "lmms-eval tasks/mmvet/utils.py and mmvet.yaml; yuweihao/MM-Vet evaluator (results JSON)"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return PRE_PROMPT + text(record, "question")

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answer")

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "question_id")

    @override
    def export_for_judge(self, run: Run, examples: Mapping[str, Example]) -> Path:
        results = {sample_id: answer for sample_id, answer in judged_answers(run).items() if sample_id in examples}
        return write_json(Path(run.path) / JUDGE_DIR / "mmvet_results.json", results)
