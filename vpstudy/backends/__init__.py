"""Decode-attention backends of the pruner's fast path: one semantics, three implementations.

- :mod:`.layout` — the contract every backend takes and returns (:class:`~.layout.KeyLayout`,
  :class:`~.layout.KeptSet`, :class:`~.layout.AnchorSelection`);
- :mod:`.reference` — pure torch, any device: the semantics and the test oracle;
- Triton — the kernels in ``kernels/`` (shipped as ``vpstudy.kernels``; they import this
  package's layout and nothing of the pruner);
- :mod:`.xformers` — partial attention over key segments + ``merge_attentions`` (CUDA);
- :mod:`.choose` — :func:`~.choose.choose_backend` and the reasons a backend cannot run;
- :mod:`.dense` — :class:`~.dense.DenseDecode`, dense decode through a backend (the kernel baseline).

This package depends on torch, :mod:`vpstudy.rules`, :mod:`vpstudy.selection` and the attention
row maths (:mod:`vpstudy.attention`), never on :mod:`vpstudy.pruning`; docs/design.md, "Layers".
"""

from .choose import NAMES, Backend, choose_backend  # noqa: F401 (re-exported)
from .dense import DenseDecode  # noqa: F401
from .errors import BackendUnavailable  # noqa: F401
