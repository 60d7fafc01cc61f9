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

The model is not normally built at all: the package ships a finished build of it in
``engine/world/shipped-models/<name>/`` (see :data:`ASSETS`), with a manifest of the same form,
and its first use copies that into the cache and checks the copy (well under a second).
Only an installation without it (or with a damaged one) and ``python -m engine.world
--rebuild`` pretrain it on the user's machine.
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


def read_manifest(folder: Path) -> dict[str, dict[str, object]] | None:
    """The ``files`` table of ``folder``'s manifest (None when it has none or it is unreadable)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


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
    return _files_problem(folder, files)


def _files_problem(folder: Path, files: dict) -> str | None:
    """The first file of a manifest's ``files`` table that ``folder`` lacks or holds changed."""
    for rel, want in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["size"] or sha256_file(f) != want["sha256"]:
            return f"{f} does not match its checksum (damaged or edited)"
    return None


# -- the build that ships with the package ---------------------------------------------

#: the package's own copy of the built world: ``<name>/`` (a model folder exactly as
#: ``python -m engine.world --rebuild`` writes it, plus its manifest) and ``<name>.build.json``
#: (what it was built from and where); listed in pyproject.toml's package-data
ASSETS = Path(__file__).resolve().with_name("shipped-models")


def shipped_dir(name: str) -> Path:
    """The folder of the shipped build of built-in model ``name`` (it may be absent)."""
    return ASSETS / name


def shipped_problem(name: str) -> str | None:
    """Why the shipped build of ``name`` cannot be used (None when it matches its manifest)."""
    folder = shipped_dir(name)
    if not (folder / MANIFEST).is_file():
        return f"this installation ships no build of {name} ({folder / MANIFEST} is missing)"
    return manifest_problem(folder)


def install_shipped(name: str, folder: Path) -> None:
    """Copy the shipped build of ``name`` into ``folder`` (a build's temporary folder) and
    check the copies against the shipped manifest; raises OSError when they differ."""
    source = shipped_dir(name)
    files = read_manifest(source) or {}
    for rel in sorted(files):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, folder / rel)  # the umask's modes, not the package's
    problem = _files_problem(folder, files)
    if problem:
        raise OSError(f"copying the shipped {name} into the world cache failed: {problem}")


def differs_from_shipped(name: str, folder: Path) -> list[str] | None:
    """The files of the finished ``folder`` (from its manifest) that are not the shipped
    build's (``[]``: it is the shipped build, bit for bit); None when nothing is shipped."""
    shipped, own = read_manifest(shipped_dir(name)), read_manifest(folder)
    if shipped is None:
        return None
    own = own or {}
    return sorted(rel for rel in set(shipped) | set(own) if shipped.get(rel) != own.get(rel))


def write_shipped(name: str, source: Path, record: dict[str, object]) -> Path:
    """Make the finished model folder ``source`` the build the package ships (maintainers,
    ``python -m engine.world --write-shipped``): its files and a fresh manifest into
    :func:`shipped_dir`, ``record`` into ``<name>.build.json`` beside it."""
    final = shipped_dir(name)
    tmp = ASSETS / f".{name}.tmp-shipping"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in file_hashes(source):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, tmp / rel)
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (ASSETS / f"{name}.build.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return final


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
