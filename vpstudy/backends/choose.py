"""Which decode backend runs the pruner's fast path on this device: one semantics, three
implementations (docs/design.md, Attention backends).

- ``reference``: pure torch (:mod:`vpstudy.backends.reference`), any device, float32 arithmetic;
  the test oracle.
- ``cpu``: pure torch written for CPUs (:mod:`vpstudy.backends.cpu`): reads only the attended
  slots, non-visual keys in place, the kept visual keys gathered; any device.
- ``triton``: the Triton kernels of :mod:`vpstudy.kernels` (CUDA; on a machine without CUDA
  only under ``TRITON_INTERPRET=1``, which is how CI tests their logic).
- ``xformers``: ``memory_efficient_attention_partial`` + ``merge_attentions``
  (:mod:`vpstudy.backends.xformers`; CUDA, float16/bfloat16).

``auto`` takes triton, then xformers, on CUDA (else the reference there), and ``cpu`` on any
other device. A backend
asked for by name that cannot run falls back to the reference with a one-line message saying why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import VpstudyError

NAMES = ("auto", "reference", "cpu", "triton", "xformers")


class BackendChoiceError(VpstudyError):
    """An unknown backend name."""


@dataclass(frozen=True)
class Backend:
    """A decode backend: ``anchor_select`` and ``sparse_decode`` with the signatures of
    :mod:`vpstudy.backends.reference`."""

    name: str
    anchor_select: Callable
    sparse_decode: Callable


def _reference() -> Backend:
    from vpstudy.backends import reference

    return Backend("reference", reference.anchor_select, reference.sparse_decode)


def _cpu() -> Backend:
    from vpstudy.backends import cpu

    return Backend("cpu", cpu.anchor_select, cpu.sparse_decode)


def _triton() -> Backend:
    from vpstudy.kernels import anchor, sparse_decode

    return Backend("triton", anchor.anchor_select, sparse_decode.sparse_decode)


def _xformers() -> Backend:
    from . import xformers

    return Backend("xformers", xformers.anchor_select, xformers.sparse_decode)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when backend ``name`` can run on ``device`` with ``dtype`` and ``head_dim``; else why not."""
    if name in ("reference", "cpu"):
        return None
    if name == "triton":
        from vpstudy.kernels import triton_unavailable_reason

        return triton_unavailable_reason(device, dtype, head_dim)
    if name == "xformers":
        from . import xformers

        return xformers.unavailable_reason(device, dtype, head_dim)
    raise BackendChoiceError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def choose_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend to run: ``name`` if it can run here, else (with a warning naming the reason)
    the reference; ``auto`` picks triton, then xformers, then the reference on CUDA, and ``cpu``
    elsewhere."""
    if name not in NAMES:
        raise BackendChoiceError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    makers = {"reference": _reference, "cpu": _cpu, "triton": _triton, "xformers": _xformers}
    if name == "auto":
        if device.type != "cuda":
            return _cpu()
        for candidate in ("triton", "xformers"):
            if unavailable_reason(candidate, device, dtype, head_dim) is None:
                return makers[candidate]()
        return _reference()
    reason = unavailable_reason(name, device, dtype, head_dim)
    if reason is not None:
        warnings.warn(f"{reason}; using the reference backend", stacklevel=3)
        return _reference()
    return makers[name]()
