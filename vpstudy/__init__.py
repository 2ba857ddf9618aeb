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
"""

__version__ = "0.1.0"

from . import pruning, stats  # noqa: E402
from .budget import BudgetRule  # noqa: E402
from .families import FAMILIES, FamilySpec, UnsupportedFamilyError, get_family  # noqa: E402
from .loading import load  # noqa: E402
from .recorder import Recorder, SampleTrace, Threshold, record  # noqa: E402
from .pruning import Pruner  # noqa: E402
from .runs import Run, open_run  # noqa: E402

__all__ = [
    "BudgetRule", "FAMILIES", "FamilySpec", "Pruner", "Recorder", "Run", "SampleTrace", "Threshold", "UnsupportedFamilyError",
    "get_family", "load", "open_run", "pruning", "record", "stats", "__version__",
]  # fmt: skip
