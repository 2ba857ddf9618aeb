"""GPU kernels (Triton) for the pruner's decode fast path, shipped as ``vpstudy.kernels``.

Each kernel is tested against the pure-torch reference backend (vpstudy.backends.reference):

- :mod:`.anchor` — one fused pass at the anchor layer: per-head visual mass at τ, the budget,
  the head-mean visual scores and the top-K kept indices of every sequence (reference:
  :func:`vpstudy.backends.reference.anchor_select`);
- :mod:`.sparse_decode` — split-K decode attention over the non-visual keys plus a per-sequence
  gathered subset of visual keys, token-exact or in blocks (reference:
  :func:`vpstudy.backends.reference.sparse_decode`).

:mod:`.layout` holds what they take and return. Triton is imported only by the kernel modules.
On a machine without CUDA the kernels run only in Triton's interpreter: set
``TRITON_INTERPRET=1`` before the kernel modules are imported (the test suite does).
"""

from __future__ import annotations

import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 256)  # smallest and largest head dim the kernels take (padded to a power of two)
BLOCK_H = 16  # smallest query-head tile of tl.dot (GQA groups are padded to it)


def pow2_at_least(n: int, least: int = 1) -> int:
    """The smallest power of two ≥ ``n`` and ≥ ``least`` (Triton tile sizes)."""
    return max(least, 1 << max(0, n - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the Triton kernels can run on ``device`` with ``dtype`` and ``head_dim``; else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device.type != "cuda" and not interpreting():
        return (f"the Triton kernels need a CUDA device (got {device.type}; "
                "TRITON_INTERPRET=1 runs them in the interpreter)")
    if dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 (got {dtype})"
    if not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1]:
        return f"the Triton kernels take head dims {HEAD_DIMS[0]}..{HEAD_DIMS[1]} (got {head_dim})"
    return None
