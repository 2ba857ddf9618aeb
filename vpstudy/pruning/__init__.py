"""Visual-token pruning during decoding (docs/design.md, "Pruning").

- :mod:`vpstudy.pruning.methods`: the methods, one module each, on the base class of
  :mod:`vpstudy.pruning.methods.base` (the places a method may act at);
- :mod:`vpstudy.pruning.registry`: the one list of methods (:data:`METHODS`,
  :func:`make_method`, the comparison rows) that the CLI, the evaluation and the tests iterate;
- :mod:`vpstudy.pruning.pruner`: :class:`Pruner`, the context manager that installs them, in
  mask mode (exact) or physical mode (gathered keys);
- :mod:`vpstudy.selection` (outside this package, shared with the decode backends): the tensor
  operations every method uses (signals, counts, top sets).
"""

from .methods import (
    DSTP,
    METHODS,
    AttributionOracle,
    DeSAP,
    FastV,
    LearnPruner,
    MethodUnavailable,
    PruningError,
    PruningMethod,
    PyramidDrop,
    RandomBudget,
    SparseVLM,
    StaticTopK,
    TopK,
    TopP,
    VisionPulse,
    VisionZip,
    make_method,
)
from .pruner import KeptTrace, Pruner

__all__ = [
    "DSTP",
    "METHODS",
    "AttributionOracle",
    "DeSAP",
    "FastV",
    "KeptTrace",
    "LearnPruner",
    "MethodUnavailable",
    "Pruner",
    "PruningError",
    "PruningMethod",
    "PyramidDrop",
    "RandomBudget",
    "SparseVLM",
    "StaticTopK",
    "TopK",
    "TopP",
    "VisionPulse",
    "VisionZip",
    "make_method",
]
