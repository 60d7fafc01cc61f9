"""Outputs the engine writes, and the one rule for replacing them: only what the engine wrote.

Every command that writes a folder (``engine run --workdir``, ``engine merge --out``,
``engine extend-tokenizer --output``, ``engine cache prune``, the world cache) goes through
this module:

1. :func:`check_disjoint` refuses, before any work, an output that is, contains or lies
   inside one of the command's inputs (paths resolved, so a symbolic link to an input is
   caught), naming both paths.
2. :func:`temp_dir` makes the temporary folder the output is written into, beside its final
   place. It carries :data:`TEMP_FILE`, so a later clean-up deletes only temporaries the
   engine made (:func:`is_engine_temp`), never a user's ``.draft.tmp-2024``; it first clears
   the temporaries of its prefix that a dead process of this host left.
3. :func:`mark_output` writes :data:`OWNER_FILE` into the finished folder: the engine's own
   marker, listing every file and folder it wrote there.
4. :func:`publish` moves the finished folder into place under an exclusive lock on the
   parent folder, after checking the target again under that lock (:func:`check_target`):
   a folder is replaced only when the engine wrote it and it holds nothing the engine did
   not write (a user's NOTES.md dropped into an old output keeps the output from being
   replaced); a file, a symbolic link or a folder of the user's is refused, with or without
   ``--overwrite``. The old folder is removed only after the new one is in place: the two
   are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``, so at every instant the final
   path holds either the complete old output or the complete new one.

Python's ``tempfile`` creates paths private (folders 0700, files 0600) whatever the umask;
:func:`temp_dir`, :func:`replace_file` and :func:`settle_modes` give outputs the modes a plain
``mkdir``/``open`` would have had (0755 / 0644 under the usual umask 022; 0700 / 0600 under
077), so a renamed output stays readable to the rest of a team.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from engine import __version__
from engine.core.errors import OutputRefused

__all__ = [
    "LEGACY_MARKERS", "OWNER_FILE", "TEMP_FILE", "check_disjoint", "check_target", "current_umask",
    "foreign_entries", "is_engine_output", "is_engine_temp", "lock_folder", "mark_output", "mark_temp",
    "publish", "read_owner", "remove_engine_temp", "replace_file", "settle_modes", "temp_dir",
]

#: the engine's marker in every folder it writes as an output
OWNER_FILE = ".lingoforge-output.json"
#: markers of outputs written before OWNER_FILE existed (a stage folder's marker), trusted as the
#: engine's own but without a list of what they hold
LEGACY_MARKERS = (".lingoforge-stage.json",)
#: the marker of a temporary folder the engine made (removed when the folder is published)
TEMP_FILE = ".lingoforge-temp"
#: how many foreign names an error lists
_SHOWN = 3


# --- modes -----------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mark_temp(folder: Path | str) -> None:
    """Mark ``folder`` as an engine temporary (:data:`TEMP_FILE`, holding the writing process
    and its host), so clean-ups may delete it once that process is gone."""
    (Path(folder) / TEMP_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def _writer_gone(path: Path) -> bool:
    """Whether the process that made the engine temporary ``path`` is dead: it ran on this
    host (by its marker) and no process of its id is alive. Unknown means alive."""
    try:
        pid, host = (path / TEMP_FILE).read_text().split()[:2]
        pid_n = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or pid_n == os.getpid():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def temp_dir(prefix: str, dir: Path | str) -> Path:  # noqa: A002 - tempfile's name
    """A new empty temporary folder in ``dir``, mode ``0o777 & ~umask``, carrying
    :data:`TEMP_FILE` (which :func:`publish` removes) so clean-ups can tell it is the engine's.

    Temporaries of the same prefix that a killed process left (an ``engine merge --out``
    killed mid-write leaves ``.OUT.tmp-*``) are removed first: only engine temporaries whose
    writer, by their marker, ran on this host and is no longer alive."""
    for stale in Path(dir).glob(f"{glob.escape(prefix)}*"):
        if is_engine_temp(stale) and _writer_gone(stale):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, 0o777 & ~current_umask())
    mark_temp(path)
    return path


def replace_file(path: Path | str, content: str | bytes) -> None:
    """Replace the file ``path`` with ``content`` whole (a reader never sees half a file).

    The new file is written inside a marked temporary folder beside ``path``
    (:func:`temp_dir`) and renamed over ``path``; so whatever a kill leaves is a folder a
    clean-up can tell is the engine's, never a loose temporary file. Mode ``0o666 & ~umask``.
    """
    path = Path(path)
    tmp = temp_dir(f".{path.name}.tmp-", path.parent)
    try:
        new = tmp / path.name
        if isinstance(content, bytes):
            new.write_bytes(content)
        else:
            new.write_text(content, encoding="utf-8")
        os.replace(new, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# --- ownership -------------------------------------------------------------------------------


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under ``folder`` (relative, posix), markers excepted."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in (*dirs, *files):
            path = (rel / name).as_posix()
            if path not in (OWNER_FILE, TEMP_FILE):
                found.append(path)
    return sorted(found)


def mark_output(folder: Path | str, kind: str, **facts: Any) -> None:
    """Mark the finished folder ``folder`` as an output the engine wrote, listing what it
    holds (call it last, when nothing more will be written there)."""
    folder = Path(folder)
    owner = {"written_by": "lingoforge", "version": __version__, "kind": kind,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **facts, "entries": _entries(folder)}
    (folder / OWNER_FILE).write_text(json.dumps(owner, indent=1) + "\n")


def read_owner(folder: Path | str) -> dict[str, Any] | None:
    """The engine's marker of ``folder`` (``{"legacy": True}`` for an older output that
    carries only a stage marker); None when the engine did not write it."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, dict) and owner.get("written_by") == "lingoforge":
        return owner
    if any((folder / m).is_file() for m in LEGACY_MARKERS):
        return {"legacy": True}
    return None


def is_engine_output(folder: Path | str) -> bool:
    """Whether ``folder`` is a folder the engine wrote as an output."""
    return read_owner(folder) is not None


def foreign_entries(folder: Path | str) -> list[str]:
    """What ``folder`` (an engine output) holds that the engine did not write there: every
    entry not in its marker's list. An older output without a list counts as all its own."""
    owner = read_owner(folder)
    if owner is None:
        return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
    listed = owner.get("entries")
    if not isinstance(listed, list):
        return []
    known = set(listed)
    return [e for e in _entries(Path(folder)) if e not in known]


def is_engine_temp(path: Path | str) -> bool:
    """Whether ``path`` is a temporary folder the engine made (it carries :data:`TEMP_FILE`)."""
    path = Path(path)
    return not path.is_symlink() and path.is_dir() and (path / TEMP_FILE).is_file()


#: the names :func:`temp_dir` gives (``tempfile``'s eight random characters after the prefix)
_TEMP_NAME = re.compile(r"\..+\.tmp-.*[a-z0-9_]{8}")


def remove_engine_temp(path: Path | str) -> bool:
    """Delete ``path`` when it is an engine temporary folder; whether it was one.

    Also an *empty* folder named as :func:`temp_dir` names them: a kill in the instant
    between making a temporary folder and marking it leaves one, and removing an empty
    folder loses nothing."""
    path = Path(path)
    if not is_engine_temp(path):
        if (_TEMP_NAME.fullmatch(path.name) and not path.is_symlink() and path.is_dir()
                and not any(path.iterdir())):
            with contextlib.suppress(OSError):
                path.rmdir()
                return True
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def check_target(final: Path | str, *, flag: str, overwrite: bool) -> None:
    """Refuse to write ``final`` unless it is absent, an empty folder, or (with
    ``overwrite``) a folder the engine wrote that holds nothing else. ``flag`` names the
    path in the error (``--out``, ``--output``, ``stage 'merged'``)."""
    final = Path(final)
    if final.is_symlink():
        raise OutputRefused(f"{flag} {final}: is a symbolic link; name a real folder (the engine never "
                            "writes through a link, nor replaces one)")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputRefused(f"{flag} {final}: is a file, not a folder; it is left as it is "
                            "(choose a folder path)")
    if not any(final.iterdir()):
        return  # an empty folder (a user's `mkdir out`): nothing is lost by replacing it
    if read_owner(final) is None:
        raise OutputRefused(f"{flag} {final}: holds files lingoforge did not write "
                            f"({_names(sorted(p.name for p in final.iterdir()))}); it is never replaced, "
                            "with or without --overwrite: choose a new or empty folder")
    if not overwrite:
        raise OutputRefused(f"{flag} {final} exists; pass --overwrite to replace it (it is an "
                            "earlier lingoforge output)")
    extra = foreign_entries(final)
    if extra:
        raise OutputRefused(f"{flag} {final}: an earlier lingoforge output that now also holds files "
                            f"lingoforge did not write ({_names(extra)}); move them out or choose "
                            "another folder")


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def check_disjoint(out: Path | str, inputs: Iterable[tuple[str, Path | str]], *, flag: str) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``(label,
    path)`` pairs; paths resolved, so links count as what they point to)."""
    target = _real(out)
    for label, path in inputs:
        source = _real(path)
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        shown = f"{out}" + (f" ({target})" if str(target) != str(out) else "")
        raise OutputRefused(f"{flag} {shown} {relation} the input {label} {path}: write the output "
                            "to a folder apart from every input")


# --- publishing --------------------------------------------------------------------------------


@contextlib.contextmanager
def lock_folder(folder: Path | str) -> Iterator[None]:
    """An exclusive ``flock`` on the folder ``folder`` itself (no lock file is left in a
    user's folder); the kernel drops it when the holder dies."""
    import fcntl

    fd = os.open(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system call or flag is not offered
    (then the caller falls back to plain renames)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path | str, final: Path | str, *, flag: str, overwrite: bool) -> None:
    """Move the finished temporary folder ``tmp`` to ``final`` (same parent folder).

    Under a lock on the parent, ``final`` is checked again (:func:`check_target`): another
    process may have written it since the command started. An older output is swapped out
    in one atomic exchange and only then removed; a refusal leaves ``final`` as it was and
    removes ``tmp``.
    """
    tmp, final = Path(tmp), Path(final)
    marked: Path | None = None  # an old output this call marked, while it may still be in place
    try:
        with lock_folder(final.parent):
            check_target(final, flag=flag, overwrite=overwrite)
            # at every moment a kill may come, whatever sits under a temporary name carries
            # the marker, so a clean-up can tell it is the engine's: the marker leaves the new
            # output only once it is in place, and the old output gets one before it is set
            # aside (a kill in between leaves a marker file in ``final``, which every reader
            # of an output ignores)
            if not final.exists():
                if not _renameat2(tmp, final, _RENAME_NOREPLACE):
                    os.rename(tmp, final)
                (final / TEMP_FILE).unlink(missing_ok=True)
                return
            if read_owner(final) is not None:  # (an empty folder is left unmarked: no data)
                mark_temp(final)
                marked = final
            if _renameat2(tmp, final, _RENAME_EXCHANGE):
                marked = None
                (final / TEMP_FILE).unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
                return
            old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")
            os.rename(final, old)
            marked = None
            os.rename(tmp, final)
            (final / TEMP_FILE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if marked is not None:  # the swap failed: the old output stays, unmarked again
            (marked / TEMP_FILE).unlink(missing_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
