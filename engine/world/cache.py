"""Where the built-in world lives on disk, and how it is published there safely.

Everything is built into a temporary folder beside its final place and renamed into
place when complete, so a killed build never leaves a folder that looks finished; a
lock file serialises builds between processes so that two first uses do not both
spend a minute pretraining.

A finished folder carries ``.manifest.json``: the world version and the size and
sha256 of every file. A folder without one, or whose files no longer match it (a
truncated or edited file, a file missing), is rebuilt, with one line on stderr naming the file; the check
runs once per folder and process. Caches of older world versions live in their own
``world-v<N>`` folders and are never read; the first build of a new version says that
an older one was found and left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.core import outputs

#: bump when the generated data, tokenizer or model would change, so old caches are ignored
WORLD_VERSION = 4


def cache_dir() -> Path:
    """``$LINGOFORGE_CACHE`` when set, else ``~/.cache/lingoforge``."""
    env = os.environ.get("LINGOFORGE_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "lingoforge"


MANIFEST = ".manifest.json"

#: folders whose manifest this process has checked already (path -> manifest mtime)
_verified: dict[Path, float] = {}
#: older cache folders this process has mentioned already
_told: set[Path] = set()


def world_dir() -> Path:
    """The versioned folder that holds this version's data and models."""
    return cache_dir() / f"world-v{WORLD_VERSION}"


def older_versions() -> list[Path]:
    """Cache folders of earlier world versions (never read by this version)."""
    out = []
    for p in cache_dir().glob("world-v*"):
        suffix = p.name[len("world-v"):]
        if p.is_dir() and suffix.isdigit() and int(suffix) < WORLD_VERSION:
            out.append(p)
    return sorted(out)


def write_manifest(folder: Path) -> None:
    """Record the version and every file's size and sha256 in ``folder/.manifest.json``."""
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": digest}
             for rel, digest in file_hashes(folder).items()}
    (folder / MANIFEST).write_text(json.dumps({"world_version": WORLD_VERSION, "files": files},
                                              indent=1, sort_keys=True))


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its manifest (None when it does). A folder without
    one cannot be vouched for (a build from before manifests, or from a development
    tree with the same version number) and is rebuilt too."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"{folder} has no {MANIFEST} (its build cannot be checked)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        version = manifest["world_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    if version != WORLD_VERSION:
        return f"{folder} was built by world version {version}, this is {WORLD_VERSION}"
    for rel, want in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["size"] or sha256_file(f) != want["sha256"]:
            return f"{f} does not match its checksum (damaged or edited)"
    return None


def _intact(final: Path) -> bool:
    """Whether a finished folder still matches its manifest; says why once when not."""
    mtime = (final / MANIFEST).stat().st_mtime if (final / MANIFEST).is_file() else -1.0
    if _verified.get(final) == mtime:
        return True
    problem = manifest_problem(final)
    if problem is None:
        _verified[final] = (final / MANIFEST).stat().st_mtime
        return True
    print(f"built-in world cache: {problem}; rebuilding {final.name}", file=sys.stderr, flush=True)
    return False


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
    the same content) and ``tmp`` is discarded; with it, ``final`` is swapped out, and only
    when the engine wrote it (:func:`engine.core.outputs.publish`; a world folder of an earlier
    version, with its manifest but no output marker, is the engine's too).
    """
    outputs.mark_output(tmp, "built-in world")
    if final.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if replace and (final / MANIFEST).is_file() and not outputs.is_engine_output(final):
        outputs.mark_output(final, "built-in world")  # an earlier version's build: adopted
    outputs.publish(tmp, final, flag="world cache", overwrite=replace)


def ensure_built(final: Path, build: Callable[[Path], None], *, message: str | None = None,
                 force: bool = False) -> Path:
    """Return ``final``, first building it with ``build(tmp_folder)`` when missing
    (or always when ``force``). ``message`` is printed to stderr before a build."""
    if final.is_dir() and not force:
        if _intact(final):
            return final
        force = True
    with build_lock(final.parent) as locked:
        if final.is_dir() and not force:  # built by another process while we waited
            return final
        if locked:  # no one else is building: temporary folders left are from killed builds
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                outputs.remove_engine_temp(stale)
        if message:
            print(message, file=sys.stderr, flush=True)
        for old in (p for p in older_versions() if p not in _told):
            _told.add(old)
            print(f"built-in world cache: {old.name} is from an older world version and is not "
                  f"used (delete it to free the space); building world-v{WORLD_VERSION}",
                  file=sys.stderr, flush=True)
        tmp = Path(outputs.temp_dir(f".{final.name}.tmp-", final.parent))
        try:
            build(tmp)
            write_manifest(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, final, replace=force)
        _verified.pop(final, None)
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
