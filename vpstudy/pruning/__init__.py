"""Visual-token pruning during decoding (SPEC, Contracts: pruning methods).

- :mod:`vpstudy.pruning.methods`: the methods as dataclasses (VisionPulse, fixed top-K, top-p,
  random budget; FastV, PyramidDrop, static top-K at prefill) and :func:`make_method`;
- :mod:`vpstudy.pruning.pruner`: :class:`Pruner`, the context manager that installs them, in
  mask mode (exact) or physical mode (gathered keys);
- :mod:`vpstudy.selection` (outside this package, shared with the decode backends): the tensor
  operations every method uses (signals, counts, top sets).
"""

from .methods import (
    METHODS,
    FastV,
    PruningError,
    PruningMethod,
    PyramidDrop,
    RandomBudget,
    StaticTopK,
    TopK,
    TopP,
    VisionPulse,
    make_method,
)
from .pruner import KeptTrace, Pruner

__all__ = [
    "METHODS", "FastV", "KeptTrace", "Pruner", "PruningError", "PruningMethod", "PyramidDrop", "RandomBudget",
    "StaticTopK", "TopK", "TopP", "VisionPulse", "make_method",
]  # fmt: skip
