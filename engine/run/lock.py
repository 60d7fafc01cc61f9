"""One ``engine run`` per workdir at a time: an ``fcntl`` lock file inside it.

Two runs on one workdir would interleave their writes: both train the same stage into
their own temporary folders and rename them over each other, one deletes the other's
"stale" temporaries at start, both rewrite report.json. The second run is therefore
refused at once with the first one's pid, rather than made to wait behind a run that may
take hours.

The lock is ``flock`` on ``<workdir>/.lingoforge.lock``: the kernel drops it when the
holder dies, even by SIGKILL, so a killed run never leaves the workdir locked. The file is
removed when the holder finishes; a run that opens the file and locks it just after the
previous holder unlinked it notices that its file is no longer the one at the path and
tries again, so two runs can never each hold "the" lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from engine.core.errors import WorkdirBusy

LOCK_FILE = ".lingoforge.lock"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process or raises
    :class:`WorkdirBusy` naming the holder's pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried only when the file was swapped under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise WorkdirBusy(f"workdir {self.workdir} is in use by {who} (another engine "
                                  "run); wait for it to finish or pass another --workdir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise WorkdirBusy(f"workdir {self.workdir}: could not take {LOCK_FILE}")  # pragma: no cover

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the module docstring
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
