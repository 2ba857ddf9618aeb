"""The one base class of every error vpstudy raises on purpose, and how OS errors read.

Each module defines its own subclass (``DatasetError``, ``RunStoreError``, ...) whose message is
one line saying what was wrong and where (a file, a field, a setting). The command line catches
:class:`VpstudyError` and prints that line; anything else is a bug in vpstudy and keeps its
traceback. The base derives from ``ValueError`` so code written against the subclasses'
earlier ``ValueError`` base keeps working.

:class:`VpstudyWarning` is a warning the command line prints as one line
(``vpstudy <command>: warning: ...``); :func:`os_error_message` turns an ``OSError`` (permission
denied, a read-only or full disk, a path under a file) into one line that says what to do.
"""

from __future__ import annotations

import errno


class VpstudyError(ValueError):
    """Bad input or settings, reported in one line (subclassed per module)."""


class VpstudyWarning(UserWarning):
    """Something that works but probably not as the user meant (printed in one line by the CLI)."""


# errno -> what to do about it
_OS_ADVICE: dict[int, str] = {
    errno.ENOSPC: "no space left on device: free some space (or choose an output on another disk)",
    errno.EDQUOT: "disk quota exceeded: free some space (or choose an output on another disk)",
    errno.EACCES: "permission denied: choose a path you can write to, or change its permissions",
    errno.EPERM: "operation not permitted: choose a path you can write to, or change its permissions",
    errno.EROFS: "read-only file system: choose an output on a writable file system",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "is a directory where a file was expected: choose another path",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
}


def os_error_message(err: OSError) -> str:
    """One line for an ``OSError``: the file(s) it concerns, what happened and what to do."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    advice = _OS_ADVICE.get(err.errno) if err.errno is not None else None
    if advice is None:
        text = str(err).strip()
        reason = err.strerror or (text.splitlines()[0] if text else "")
        advice = f"{reason} ({type(err).__name__})" if reason else type(err).__name__
    return f"{where}: {advice}" if where else advice
