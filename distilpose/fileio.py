"""Atomic file writes (write a temporary file, then rename it over the target) that never
replace a device, FIFO or other non-regular file: ``--out /dev/null`` must discard the output,
not turn /dev/null into a regular file (which a rename would do when run as root)."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Union

__all__ = ["atomic_write", "is_special", "replace_into", "staging_dir", "staging_path"]


def is_special(path: str) -> bool:
    """True when ``path`` exists (following symlinks) and is not a regular file or directory."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def staging_dir(path: str) -> str:
    """Where to put the temporary file for ``path``: its own folder (same filesystem, so the
    final rename is atomic), or the system temp folder when ``path`` is a special file."""
    if is_special(path):
        return tempfile.gettempdir()
    return os.path.dirname(os.path.abspath(path))


def staging_path(path: str, suffix: str = ".tmp") -> str:
    """``path + suffix`` for a regular target; a file in the system temp folder for a special one."""
    if is_special(path):
        return os.path.join(tempfile.gettempdir(), f".tmp-{os.getpid()}-{os.path.basename(path)}{suffix}")
    return path + suffix


def replace_into(tmp: str, path: str) -> None:
    """``os.replace(tmp, path)``, except onto a special file: its content is written through
    (/dev/null discards it, a FIFO passes it on) and ``tmp`` is removed."""
    if is_special(path):
        try:
            with open(tmp, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        finally:
            os.unlink(tmp)
        return
    os.replace(tmp, path)


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text or bytes) to ``path`` so that a reader never sees a partial file:
    a temporary file in the same folder, flushed to disk, then renamed over ``path``.
    Creates the folder; a special ``path`` (/dev/null, a FIFO) is written through instead."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = staging_path(path, f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_into(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
