"""Decode-attention backends of the pruner's fast path: one semantics (``vpstudy.kernels.reference``),
three implementations (reference, Triton, xformers), chosen per device by :mod:`.choose`.

- :mod:`.choose` — :func:`~.choose.choose_backend` and the reasons a backend cannot run;
- :mod:`.xformers` — partial attention over key segments + ``merge_attentions`` (CUDA);
- :mod:`.dense` — :class:`~.dense.DenseDecode`, dense decode through a backend (the kernel baseline).

The Triton kernels and the reference live in ``kernels/`` (``vpstudy.kernels``).
"""

from .choose import NAMES, Backend, choose_backend  # noqa: F401 (re-exported)
from .dense import DenseDecode  # noqa: F401
from .errors import BackendUnavailable  # noqa: F401
