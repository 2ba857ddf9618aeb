"""vpstudy: step-dependent visual evidence in vision-language models.

Entry points::

    model, processor = vpstudy.load("path/to/model")
    with vpstudy.record(model, layers=[0, 1]) as rec:
        model.generate(**inputs, max_new_tokens=32)
    traces = rec.traces()
    run = vpstudy.open_run("runs/my-run")   # DataFrames and score arrays of a recorded run
    vpstudy.stats.correlation_table(run)    # statistics with intervals (vpstudy analyze)
    rule = vpstudy.BudgetRule.load("rule.json")
    with vpstudy.Pruner(model, [vpstudy.pruning.VisionPulse(rule=rule)]):
        model.generate(**inputs, max_new_tokens=32)

The names below are imported on first use, so ``import vpstudy.pruning`` (the decode path) does
not pull in the analysis layer (pandas, the run store, the statistics); docs/design.md, "Layers".
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (a module name itself for subpackages)
_EXPORTS = {
    "BudgetRule": "vpstudy.rules",
    "Threshold": "vpstudy.rules",
    "VpstudyError": "vpstudy.errors",
    "FAMILIES": "vpstudy.families",
    "FamilySpec": "vpstudy.families",
    "UnsupportedFamilyError": "vpstudy.families",
    "get_family": "vpstudy.families",
    "load": "vpstudy.loading",
    "Recorder": "vpstudy.recorder",
    "SampleTrace": "vpstudy.recorder",
    "record": "vpstudy.recorder",
    "Pruner": "vpstudy.pruning",
    "Run": "vpstudy.runs",
    "open_run": "vpstudy.runs",
}
_SUBPACKAGES = ("pruning", "stats")

__all__ = sorted([*_EXPORTS, *_SUBPACKAGES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"vpstudy.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vpstudy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
