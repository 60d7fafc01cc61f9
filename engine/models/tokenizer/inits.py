"""How the embedding rows of tokens a vocabulary gains are initialised: the plugin interface.

A tokenizer change (``engine extend-tokenizer``, ``engine transplant-tokenizer``, the
``vocabulary`` stage) keeps the rows of the tokens the old and the new vocabulary share
exactly and asks an *init method* for the rest. Init methods are plugins: a module
implements the hook ``register_embedding_inits`` (:mod:`engine.registry.hookspecs`) and
calls ``register(method)`` once per method, exactly as a stage plugin registers its
implementations. A method is a small object:

* ``name``: what ``--init`` (and the stage's ``init:``) names;
* ``Params``: a :class:`~engine.core.params.PluginParams` of its options (``--init-param
  KEY=VALUE``, the stage's ``init_params:``);
* ``init_rows(problem, params)``: given an :class:`InitProblem`, return an
  :class:`InitRows`, one input row (and one head row, for a model whose head is not tied)
  per new token, in the order of ``problem.new_tokens``;
* optionally ``description`` (one line), ``requires`` (module names it imports when it
  runs) and ``extra`` (the extra that installs them).

Why a hook and not a stage kind: an initialisation never runs alone and has no output of
its own; it fills rows inside one of the commands above, which own the output folder,
the tokenizer and the atomic publishing. A stage kind would give it a recipe entry, a
runner path and a conformance suite for something that cannot be a step of a recipe.

The built-ins are ``mean``, ``random``, ``omp`` and ``focus`` (``plugins/init_*.py``;
docs/extend-tokenizer.md, "Initialising the new rows"). :func:`initialise` looks a
method up, validates its params, runs it and checks what it returns (shape, finite).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import ValidationError

from engine.core.errors import ModelLoadError
from engine.core.params import PluginParams
from engine.core.suggest import did_you_mean
from engine.registry import manager
from engine.registry.implementation import missing_requirements, requirement_hint

__all__ = ["HOOK", "EmbeddingInit", "InitProblem", "InitRows", "NewToken", "get_init", "init_methods",
           "initialise", "parse_init_params", "piece_mean", "random_rows"]

#: the hook init methods are registered through
HOOK = "register_embedding_inits"


@dataclass(frozen=True)
class NewToken:
    """One token the new vocabulary has and the old one lacks."""

    #: its id (row) in the new vocabulary
    id: int
    #: as the new tokenizer's vocabulary spells it (byte-level: GPT-2's byte alphabet)
    token: str
    #: the bytes of text it stands for (UTF-8; a piece of a character for some byte-level tokens)
    surface: bytes
    #: the ids the old tokenizer splits the same text into (its decomposition); empty when
    #: the old tokenizer cannot spell it (a special token of the new tokenizer, say)
    pieces: tuple[int, ...]
    #: a special (added) token of the new tokenizer
    special: bool = False


@dataclass
class InitProblem:
    """Everything an init method may use. Tensors are float32 on the CPU."""

    #: the old input embedding, [old vocabulary rows, hidden]
    old_input: torch.Tensor
    #: the old output head, same shape; None when the model ties it to the input embedding
    old_output: torch.Tensor | None
    #: the tokens whose rows are wanted, in the order the returned rows must follow
    new_tokens: list[NewToken]
    #: new id -> old id of every token both vocabularies have (copied exactly, not asked for)
    shared: dict[int, int]
    #: the tokenizers (``tokenizers.Tokenizer``) before and after
    old_tokenizer: Any
    new_tokenizer: Any
    #: text in the target language (the data the tokenizer was learned on, or given); may be empty
    texts: Sequence[str] = ()
    seed: int = 0
    #: a donor model's input embedding and head over the NEW vocabulary, when the new tokenizer
    #: came from a model folder with weights (a space where new and shared tokens are both known)
    donor_input: torch.Tensor | None = None
    donor_output: torch.Tensor | None = None
    #: the key a surface (bytes) has in every tokenizer involved: byte-level strings
    surface_key: Callable[[bytes], str] = field(default=lambda b: b.decode("latin-1"))
    #: the old tokenizer's split of a surface (ids), as used for ``NewToken.pieces``
    old_split: Callable[[bytes], list[int]] = field(default=lambda b: [])
    #: the new tokenizer's split of a surface (ids in the new vocabulary)
    new_split: Callable[[bytes], list[int]] = field(default=lambda b: [])
    #: each vocabulary: id -> surface (special tokens: None)
    old_surfaces: dict[int, bytes | None] = field(default_factory=dict)
    new_surfaces: dict[int, bytes | None] = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return self.old_output is None

    @property
    def hidden(self) -> int:
        return int(self.old_input.shape[1])


@dataclass
class InitRows:
    """What an init method returns: one row per new token, in ``problem.new_tokens`` order."""

    input: torch.Tensor
    #: head rows; None for a tied model (and only then)
    output: torch.Tensor | None = None
    #: facts recorded in lingoforge.json and printed (counts of fallbacks, sparsity, seconds)
    notes: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EmbeddingInit(Protocol):
    """What ``register(...)`` of :data:`HOOK` accepts."""

    name: str
    Params: type[PluginParams]

    def init_rows(self, problem: InitProblem, params: Any) -> InitRows: ...


# --- helpers the built-ins share (and a third-party method may use) -------------------------


def piece_mean(matrix: torch.Tensor, tokens: Sequence[NewToken]) -> torch.Tensor:
    """Each token's row: the mean of ``matrix``'s rows of its pieces (the mean of every
    row for a token without pieces)."""
    fallback = matrix.mean(0)
    rows = [matrix[list(t.pieces)].mean(0) if t.pieces else fallback for t in tokens]
    return torch.stack(rows) if rows else matrix.new_zeros((0, matrix.shape[1]))


def random_rows(matrix: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` rows drawn from a normal with ``matrix``'s per-dimension mean and deviation."""
    mean, std = matrix.mean(0), matrix.std(0)
    return mean + std * torch.randn((n, matrix.shape[1]), generator=generator, dtype=matrix.dtype)


# --- the registry of init methods ------------------------------------------------------------


@dataclass(frozen=True)
class _Registered:
    method: Any
    plugin: str

    @property
    def builtin(self) -> bool:
        return self.plugin in manager.DEFAULT_PLUGINS


_reported: set[str] = set()


def _warn_once(plugin: str, message: str) -> None:
    if plugin not in _reported:
        _reported.add(plugin)
        print(f"warning: plugin {plugin!r}: {message}; its init methods were skipped", file=sys.stderr)


def _check(method: Any) -> str | None:
    """Why ``method`` is not an init method (None: it is)."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        return f"an init method {method!r} has no string 'name'"
    params = getattr(method, "Params", None)
    if not (isinstance(params, type) and issubclass(params, PluginParams)):
        return f"init method {name!r}: Params must subclass engine.api.PluginParams"
    if not callable(getattr(method, "init_rows", None)):
        return f"init method {name!r} has no init_rows(problem, params)"
    return None


def _providers() -> dict[str, list[_Registered]]:
    """name -> the methods registered under it, a plugin that is not built in first."""
    manager.load_plugins()
    found: dict[str, list[_Registered]] = {}
    for impl in getattr(manager.pm.hook, HOOK).get_hookimpls():
        plugin = manager.pm.get_name(impl.plugin) or repr(impl.plugin)
        if plugin in {b.name for b in manager.broken_plugins()}:
            continue
        got: list[Any] = []
        try:
            impl.function(register=got.append)
        except Exception as exc:  # a broken plugin must not take the command down
            _warn_once(plugin, f"{HOOK} failed: {type(exc).__name__}: {exc}")
            continue
        problems = [p for p in (_check(m) for m in got) if p]
        if problems:
            _warn_once(plugin, problems[0])
            continue
        for method in got:
            found.setdefault(method.name, []).append(_Registered(method, plugin))
    for regs in found.values():
        regs.sort(key=lambda r: r.builtin)  # stable: a third party's wins a bare name
    return found


def init_methods() -> dict[str, Any]:
    """The method each bare name runs: ``{name: method}``."""
    return {name: regs[0].method for name, regs in _providers().items()}


def get_init(name: str) -> Any:
    """The method ``name`` names (``PLUGIN:name`` reaches a shadowed one), or an error that
    lists the available ones."""
    found = _providers()
    plugin, _, bare = name.rpartition(":")
    regs = found.get(bare, [])
    if plugin:
        regs = [r for r in regs if plugin in (r.plugin, manager.plugin_distribution(r.plugin))]
    if not regs:
        raise ModelLoadError(f"no init method named {name!r}; available: {', '.join(sorted(found)) or 'none'}"
                             f"{did_you_mean(bare, found)}")
    method = regs[0].method
    if missing_requirements(method):
        hint = requirement_hint(method, manager.plugin_distribution(regs[0].plugin))
        raise ModelLoadError(f"init method {name!r} {hint}")
    return method


def parse_init_params(items: Sequence[str], flag: str = "--init-param") -> dict[str, Any]:
    """``KEY=VALUE`` strings into a dict; values read as YAML scalars (``8``, ``0.5``, ``true``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ModelLoadError(f"{flag} {item!r}: write KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def initialise(name: str, problem: InitProblem, params: Mapping[str, Any] | None = None,
               *, where: str = "--init-param") -> InitRows:
    """Run init method ``name`` on ``problem`` with ``params`` (validated by its ``Params``;
    an invalid one is a one-line error naming ``where`` and the field) and check its rows."""
    method = get_init(name)
    try:
        parsed = method.Params(**dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err.get("loc", ())) or "?"
        raise ModelLoadError(f"{where} {key}: {err.get('msg')} (init method {name!r})") from None
    if not problem.new_tokens:
        empty = problem.old_input.new_zeros((0, problem.hidden))
        return InitRows(empty, None if problem.tied else empty.clone(), {})
    rows = method.init_rows(problem, parsed)
    n, d = len(problem.new_tokens), problem.hidden
    for what, t in (("input", rows.input), ("output", rows.output)):
        if what == "output" and problem.tied:
            if t is not None:
                raise ModelLoadError(f"init method {name!r} returned head rows for a model whose head "
                                     "is tied to its input embedding")
            continue
        if t is None or tuple(t.shape) != (n, d):
            got = None if t is None else tuple(t.shape)
            raise ModelLoadError(f"init method {name!r}: {what} rows have shape {got}, expected {(n, d)}")
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"init method {name!r}: {what} rows hold NaN or infinite values")
    rows.input = rows.input.float()
    rows.output = None if rows.output is None else rows.output.float()
    return rows
