"""Errors of the decode backends."""

from __future__ import annotations

from ..errors import VpstudyError


class BackendUnavailable(VpstudyError, RuntimeError):
    """A decode backend cannot run on this device, dtype or head dim; the message says why, in one line."""
