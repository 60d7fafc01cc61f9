"""Where the built-in world lives on disk, and how it is published there safely.

Everything is built into a temporary folder beside its final place and renamed into
place when complete, so a killed build never leaves a folder that looks finished; a
lock file serialises builds between processes so that two first uses do not both
spend a minute pretraining.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: bump when the generated data, tokenizer or model would change, so old caches are ignored
WORLD_VERSION = 3


def cache_dir() -> Path:
    """``$LINGOFORGE_CACHE`` when set, else ``~/.cache/lingoforge``."""
    env = os.environ.get("LINGOFORGE_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "lingoforge"


def world_dir() -> Path:
    """The versioned folder that holds this version's data and models."""
    return cache_dir() / f"world-v{WORLD_VERSION}"


@contextmanager
def build_lock(folder: Path) -> Iterator[bool]:
    """An exclusive inter-process lock on ``folder/.lock``; yields whether it is really
    held (False where fcntl is absent: the rename still keeps builds safe)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Rename a finished ``tmp`` folder to ``final``.

    Without ``replace`` an existing ``final`` wins (another process finished first with
    the same content) and ``tmp`` is discarded; with it, ``final`` is swapped out.
    """
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return
    os.replace(tmp, final)


def ensure_built(final: Path, build: Callable[[Path], None], *, message: str | None = None,
                 force: bool = False) -> Path:
    """Return ``final``, first building it with ``build(tmp_folder)`` when missing
    (or always when ``force``). ``message`` is printed to stderr before a build."""
    if final.is_dir() and not force:
        return final
    with build_lock(final.parent) as locked:
        if final.is_dir() and not force:  # built by another process while we waited
            return final
        if locked:  # no one else is building: temporary folders left are from killed builds
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if message:
            print(message, file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, final, replace=force)
    return final


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under ``folder`` (sorted)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}
