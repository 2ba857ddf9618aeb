r"""MMStar (Chen et al. 2024): vision-indispensable multiple-choice questions, options A-D.

Schema (``Lin-Chen/MMStar``, as lmms-eval's ``tasks/mmstar/utils.py`` reads it and the card's
``dataset_info`` lists it): ``index`` int64, ``question`` string (the options are part of it:
``"...\nOptions: A: ..., B: ..., C: ..., D: ..."``), ``image`` Image, ``answer`` string (a
letter), ``category`` and ``l2_category`` string, ``meta_info`` struct (source, split,
image_path); one split, ``val`` (1,500 rows).

Prompt: lmms-eval ``mmstar_doc_to_text`` with the default kwargs: the stripped question without
``" Please answer yes or no."``, then ``"\nAnswer with the option's letter from the given
choices directly"``. (VLMEvalKit rebuilds the options from A-D columns of its own TSV.)

Scorer: :class:`~vpstudy.scoring.MCQLetter`, lmms-eval's letter extraction over A-D.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from ..scoring import MCQLetter
from .base import Benchmark, answer_list, register, text


@register
class MMStar(Benchmark):
    """MMStar, ``val`` split: the question with its A-D options and the letter instruction."""

    name = "mmstar"
    title = "MMStar"
    hub_ids = ("Lin-Chen/MMStar",)
    default_split = "val"
    signature = frozenset({"index", "question", "answer", "category", "l2_category"})
    required = ("index", "question", "answer")
    scorer = MCQLetter(letters="ABCD")
    sources = "lmms-eval tasks/mmstar/utils.py and _default_template_yaml; lmms-eval _task_utils/mcq_extract.py"

    @override
    def prompt(self, record: Mapping[str, Any]) -> str:
        question = text(record, "question").strip().replace(" Please answer yes or no.", "")
        return f"{question}\nAnswer with the option's letter from the given choices directly"

    @override
    def answers(self, record: Mapping[str, Any]) -> list[str] | None:
        return answer_list(record, "answer")

    @override
    def example_id(self, record: Mapping[str, Any], index: int) -> str:
        return text(record, "index")
