"""vpstudy: step-dependent visual evidence in vision-language models.

Entry points::

    model, processor = vpstudy.load("path/to/model")
    with vpstudy.record(model, layers=[0, 1]) as rec:
        model.generate(**inputs, max_new_tokens=32)
    traces = rec.traces()
    run = vpstudy.open_run("runs/my-run")   # DataFrames and score arrays of a recorded run
"""

__version__ = "0.1.0"

from .families import FAMILIES, FamilySpec, UnsupportedFamilyError, get_family  # noqa: E402
from .loading import load  # noqa: E402
from .recorder import Recorder, SampleTrace, Threshold, record  # noqa: E402
from .runs import Run, open_run  # noqa: E402

__all__ = [
    "FAMILIES", "FamilySpec", "Recorder", "Run", "SampleTrace", "Threshold", "UnsupportedFamilyError",
    "get_family", "load", "open_run", "record", "__version__",
]  # fmt: skip
