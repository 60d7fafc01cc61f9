"""Temporary folders and files for outputs, created with the modes the process umask gives.

Every output is written to a temporary path and renamed into place when complete. Python's
``tempfile`` creates those paths private (folders 0700, files 0600) whatever the umask, so
a renamed output would stay unreadable to the rest of a team on a shared machine. These
helpers create them the same way and then give them the mode a plain ``mkdir`` or
``open`` would have had (0755 / 0644 under the usual umask 022; 0700 / 0600 under 077).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["current_umask", "settle_modes", "temp_dir", "temp_file"]


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(prefix: str, dir: Path | str) -> Path:  # noqa: A002 - tempfile's name
    """A new empty folder in ``dir``, mode ``0o777 & ~umask``."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def temp_file(prefix: str, suffix: str, dir: Path | str) -> tuple[int, str]:  # noqa: A002
    """``(fd, path)`` of a new empty file in ``dir``, mode ``0o666 & ~umask``."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, path


def settle_modes(folder: Path | str) -> None:
    """Give every folder and file under ``folder`` (itself included) the mode a fresh
    ``mkdir``/``open`` would have under the umask: files copied from an input (which keep
    the input's mode) and files a library created private alike. Executable files stay
    executable; symbolic links are left alone."""
    mask = current_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(path, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)
