"""CharXiv reasoning (Wang et al. 2024): reasoning questions about charts from arXiv papers,
graded by an LLM judge (GPT-4o in the official code, gpt-4o-mini in VLMEvalKit).

Schema (``princeton-nlp/CharXiv``, the columns lmms-eval's ``tasks/charxiv/utils.py`` reads):
``image`` Image, ``figure_path`` string (``images/<figure id>.jpg``), ``reasoning_q`` string,
``reasoning_q_source`` int (the instruction category: 1 text-in-chart, 2 text-in-general,
3 number-in-chart, 4 number-in-general), ``reasoning_a`` string, plus the descriptive questions
(``descriptive_q1``...``descriptive_a4``) and subplot columns; splits ``validation`` and
``test`` (answers withheld).

Prompt: the official response instructions (princeton-nlp/CharXiv ``src/constants.py``
``REASONING_RESP_INST``, as lmms-eval ``charxiv_reasoning_doc_to_text_cot`` applies them, with
the decimal-places line for category 4), stripped as lmms-eval's messages strip it.

Score: none computed here. The judge reads the official response file
``gen-<model>-reasoning_val.json`` ({figure id: {figure_id, inst_category, raw_question,
response}}), which :meth:`CharXivReasoning.export_for_judge` writes to ``RUN/judge/``; run
``python src/evaluate.py --model_name vpstudy --split val --mode reasoning`` in a CharXiv
checkout with it in ``results/`` (the script expects every validation question).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ..scoring import LLMJudge
from .base import JUDGE_DIR, Benchmark, judged_answers, register, text, write_json

if TYPE_CHECKING:
    from ..datasets import Example
    from ..runs import Run

RESPONSE_INSTRUCTIONS = {
    1: "{}\n    * Your final answer must be grounded to some text that is explicitly written and relevant to the "
    "question in the chart.\n    * If you need to answer multiple terms, separate them with commas.\n    * Unless "
    "specified in the question (such as answering with a letter), you are required to answer the full names of "
    "subplots and/or labels by default.\n    ",
    2: "{}\n    * If there are options in the question, your final answer must conform to one of the options.\n    * "
    "If there are additional instructions in the question, follow them accordingly.\n    * If there are neither "
    "options nor additional instructions, you are allowed to respond with a short phrase only.\n    ",
    3: "{}\n    * Your final answer must be grounded to a number that is exlicitly written and relevant to the "
    "question in the chart, even if it's an approximate value.\n    * You are allowed to extract numbers within "
    "some text when needed.\n    ",
    4: "{}\n    {}\n    ",
}


def number_instruction(answer: str) -> str:
    """The official ``get_number_instruction``: an exact integer, or N decimal places like the answer."""
    whole, _, decimals = answer.partition(".")
    if not decimals:
        return "* Your final answer must be an exact integer."
    return f"* Your final answer must be a number with {len(decimals)} decimal places."


def figure_id(record: Mapping[str, Any], fallback: str) -> str:
    """The figure id of a record: the stem of ``figure_path`` (``images/12.jpg`` -> ``12``)."""
    path = text(record, "figure_path")
    return PurePosixPath(path).stem if path else fallback


@register
class CharXivReasoning(Benchmark):
    """CharXiv reasoning questions with the official response instructions; judged outside vpstudy."""

    name = "charxiv"
    title = "CharXiv reasoning"
    hub_ids = ("princeton-nlp/CharXiv",)
    default_split = "validation"
    signature = frozenset({"reasoning_q", "reasoning_a", "reasoning_q_source"})
    required = ("figure_path", "reasoning_q", "reasoning_q_source", "reasoning_a")
    scorer = LLMJudge()
    sources = (
        "princeton-nlp/CharXiv src/constants.py, reasoning_utils.py, generate.py, evaluate.py; "
        "lmms-eval tasks/charxiv/utils.py"
    )

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        category = int(record["reasoning_q_source"])
        template = RESPONSE_INSTRUCTIONS.get(category, "{}")
        if category == 4:
            return template.format(text(record, "reasoning_q"), number_instruction(text(record, "reasoning_a"))).strip()
        return template.format(text(record, "reasoning_q")).strip()

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        answer = text(record, "reasoning_a")
        return [answer] if answer else None

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return figure_id(record, str(index))

    @override
    def export_for_judge(self, run: Run, examples: Mapping[str, Example]) -> Path:
        responses = {}
        for sample_id, answer in judged_answers(run).items():
            example = examples.get(sample_id)
            if example is None:
                continue
            fid = int(sample_id) if sample_id.isdigit() else sample_id
            responses[sample_id] = {
                "figure_id": fid,
                "inst_category": int(example.extra["reasoning_q_source"]),
                "raw_question": str(example.extra["reasoning_q"]),
                "response": answer,
            }
        return write_json(Path(run.path) / JUDGE_DIR / "gen-vpstudy-reasoning_val.json", responses)
