"""Decode-attention backends of the pruner's fast path (reference, Triton, xformers)."""

from .errors import BackendUnavailable  # noqa: F401 (re-exported)
