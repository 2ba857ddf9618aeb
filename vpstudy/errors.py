"""The one base class of every error vpstudy raises on purpose.

Each module defines its own subclass (``DatasetError``, ``RunStoreError``, ...) whose message is
one line saying what was wrong and where (a file, a field, a setting). The command line catches
:class:`VpstudyError` and prints that line; anything else is a bug in vpstudy and keeps its
traceback. The base derives from ``ValueError`` so code written against the subclasses'
earlier ``ValueError`` base keeps working.
"""

from __future__ import annotations


class VpstudyError(ValueError):
    """Bad input or settings, reported in one line (subclassed per module)."""
