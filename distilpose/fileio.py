"""Atomic file writes (write a temporary file, then rename it over the target) that never
replace a device, FIFO or other non-regular file: ``--out /dev/null`` must discard the output,
not turn /dev/null into a regular file (which a rename would do when run as root)."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Union

__all__ = ["atomic_write", "fsync_dir", "is_special", "new_file_mode", "replace_into", "staging_dir", "staging_path"]


def new_file_mode(path: str) -> int:
    """Permission bits for a file replacing ``path``: those of the file already there (a rename
    must not change who may read it), else what ``open()`` would give a new file (0o666 & ~umask),
    not the 0o600 of ``tempfile.mkstemp``."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is a set-and-get:
    the round trip would briefly leave other threads with umask 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_dir(folder: str) -> None:
    """fsync a folder so that a rename inside it survives a crash (best effort: not every
    platform or filesystem lets a folder be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    os.chmod(tmp, new_file_mode(path))
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


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
