"""MIA-Bench (Qian et al. 2025): instruction following with layered, compositional
instructions, graded component by component by an LLM judge (GPT-4o).

Schema (the ``lmms-lab/MIA-Bench`` dataset card, ``dataset_info``): ``image`` Image,
``instruction`` string, ``type`` string, ``num_of_component`` int32, ``components`` sequence of
string, ``component_weight`` sequence of int32, ``component_type`` sequence of string; one split,
``test`` (400 rows). No reference answer and no id column: the id is the row index.

Prompt: lmms-eval ``mia_bench_doc_to_text`` (empty default kwargs) and VLMEvalKit agree: the
instruction alone.

Score: none computed here. :meth:`MIABench.export_for_judge` writes
``RUN/judge/mia_bench_responses.jsonl``: one JSON object per line with ``text`` (the response)
and ``url`` (the image URL when the dataset has ``image_url``, else null), the fields the
official notebook (apple/ml-mia-bench ``evaluation.ipynb``) reads, plus ``id``, ``instruction``,
``type``, ``components``, ``component_weight`` and ``component_type``, which the judge's prompt
is built from (lmms-eval and VLMEvalKit ``generate_prompt``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ..scoring import LLMJudge
from .base import JUDGE_DIR, Benchmark, judged_answers, register, string_list, text, write_atomic

if TYPE_CHECKING:
    from ..datasets import Example
    from ..runs import Run


@register
class MIABench(Benchmark):
    """MIA-Bench: the instruction alone; its components are judged outside vpstudy."""

    name = "mia_bench"
    title = "MIA-Bench"
    hub_ids = ("lmms-lab/MIA-Bench", "lmms-lab-encoder/MIA-Bench")
    default_split = "test"
    signature = frozenset({"instruction", "components", "component_weight"})
    required = ("instruction", "components", "component_weight")
    scorer = LLMJudge()
    sources = (
        "lmms-eval tasks/mia_bench/utils.py and mia_bench.yaml; VLMEvalKit dataset/miabench.py; "
        "apple/ml-mia-bench README"
    )

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        return text(record, "instruction")

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return None

    @override
    def export_for_judge(self, run: Run, examples: Mapping[str, Example]) -> Path:
        lines = []
        for sample_id, answer in judged_answers(run).items():
            example = examples.get(sample_id)
            if example is None:
                continue
            extra = example.extra
            row = {
                "id": sample_id,
                "url": extra.get("image_url"),
                "text": answer,
                "instruction": text(extra, "instruction"),
                "type": text(extra, "type"),
                "components": string_list(extra.get("components")) or [],
                "component_weight": [int(w) for w in extra.get("component_weight") or []],
                "component_type": string_list(extra.get("component_type")) or [],
            }
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        return write_atomic(Path(run.path) / JUDGE_DIR / "mia_bench_responses.jsonl", "".join(lines))
