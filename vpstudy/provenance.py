"""What produced a result: package versions recorded in run manifests and benchmark JSON."""

from __future__ import annotations

import platform

import numpy as np
import pandas as pd
import torch


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour a recorded number depends on."""
    import transformers

    from . import __version__

    return {
        "vpstudy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }
