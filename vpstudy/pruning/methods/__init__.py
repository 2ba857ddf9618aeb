"""The pruning methods, one module each, registered in :mod:`vpstudy.pruning.registry`.

Importing this package imports every method module, which registers its class; :data:`ORDER`
is the order of the registry (and of the comparison table, the CLI help and the tests).

Step-wise (decide again at every decode step): :mod:`.visionpulse`, :mod:`.topk`, :mod:`.topp`,
:mod:`.random_budget`. Prefill (decide once): :mod:`.static_topk`, :mod:`.fastv`,
:mod:`.pyramiddrop`, :mod:`.sparsevlm`, and :mod:`.dstp` (a prefill method's set, re-selected
during decoding). After the vision encoder: :mod:`.visionzip`, :mod:`.desap`, :mod:`.learnpruner`
(with a second, prefill stage). The base class and what a method sees: :mod:`.base`.
"""

from ..registry import METHODS, make_method, set_order
from .attribution_oracle import AttributionOracle
from .base import (
    Decision,
    EncoderContext,
    FeatureSelection,
    HiddenEdit,
    MethodUnavailable,
    PruningError,
    PruningMethod,
    Stage,
)
from .desap import DeSAP
from .dstp import DSTP
from .fastv import FastV
from .learnpruner import LearnPruner
from .pyramiddrop import PyramidDrop
from .random_budget import RandomBudget
from .sparsevlm import SparseVLM
from .static_topk import StaticTopK
from .topk import TopK
from .topp import TopP
from .visionpulse import VisionPulse
from .visionzip import VisionZip

ORDER = (
    "visionpulse",
    "topk",
    "topp",
    "random",
    "static_topk",
    "fastv",
    "pyramiddrop",
    "dstp",
    "sparsevlm",
    "visionzip",
    "desap",
    "learnpruner",
    "attribution_oracle",
)
"""Step-wise methods, then prefill methods, then encoder-side ones, then the reference row."""
set_order(ORDER)

__all__ = [
    "ORDER",
    "AttributionOracle",
    "DSTP",
    "METHODS",
    "DeSAP",
    "Decision",
    "EncoderContext",
    "FastV",
    "FeatureSelection",
    "HiddenEdit",
    "LearnPruner",
    "MethodUnavailable",
    "PruningError",
    "PruningMethod",
    "PyramidDrop",
    "RandomBudget",
    "SparseVLM",
    "Stage",
    "StaticTopK",
    "TopK",
    "TopP",
    "VisionPulse",
    "VisionZip",
    "make_method",
]
