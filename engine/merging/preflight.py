"""Pre-flight checks of merge inputs: config.json and safetensors headers, no tensor data.

A merge that fails on tensor 290 of 291 after twenty minutes wastes the user's time;
everything that can be known from headers is checked before the first tensor is read,
and every error names the model and the tensor at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import modelio
from engine.api import ModelArtifact
from engine.errors import EngineError, MergeError
from engine.merging.tensorio import TensorInfo, read_tensor_infos
from engine.merging.vocab import VocabPlan, check_tokenizers, plan_vocab, token_ids

__all__ = ["MergeInput", "MergePlan", "check_configs", "check_merge_inputs", "check_merge_paths"]

_SHOW = 5  # names listed in an error before "and N more"


@dataclass
class MergeInput:
    """One model folder taking part in a merge: its recipe name, config and headers."""

    name: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]


@dataclass
class MergePlan:
    """Checked inputs. ``reference`` is the model whose tensor names, order, config and
    tokenizer the output takes: the base when there is one, else the first model."""

    base: MergeInput | None
    models: list[MergeInput]
    vocab: VocabPlan | None = None

    @property
    def reference(self) -> MergeInput:
        return self.base if self.base is not None else self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _describe(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or ["?"]
    return f"model_type {config.get('model_type')!r} ({', '.join(archs)})"


def _same_architecture(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("model_type") == b.get("model_type")
            and (a.get("architectures") or None) == (b.get("architectures") or None))


def check_configs(configs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Architecture agreement from config.json alone (for ``engine validate``).

    ``configs`` is ``{"base": [config], "models": [config, ...]}`` as the validator
    passes it to an implementation's ``check``.
    """
    every = [*configs.get("base", []), *configs.get("models", [])]
    for i, cfg in enumerate(every[1:], start=1):
        if not _same_architecture(every[0], cfg):
            raise MergeError(f"merge input {i} is {_describe(cfg)} but input 0 is "
                             f"{_describe(every[0])}; models of different architectures cannot be merged")


def _vocab_size(m: MergeInput) -> int | None:
    v = m.config.get("vocab_size", (m.config.get("text_config") or {}).get("vocab_size"))
    return int(v) if v is not None else None


def _is_vocab_row_change(ref: MergeInput, other: MergeInput, mine: TensorInfo,
                         theirs: TensorInfo) -> bool:
    """Shapes differ only in dim 0, and dim 0 is each model's vocab_size (docs: vocab rule)."""
    rv, ov = _vocab_size(ref), _vocab_size(other)
    return (rv is not None and ov is not None and rv != ov and len(mine.shape) >= 1
            and mine.shape[1:] == theirs.shape[1:]
            and mine.shape[0] == rv and theirs.shape[0] == ov)


def _load(artifact: ModelArtifact) -> MergeInput:
    try:
        config = modelio.check_model_folder(artifact.path)
        tensors = read_tensor_infos(artifact.path)
    except EngineError as exc:
        raise MergeError(f"model {artifact.name!r}: {exc}") from None
    if not tensors:
        raise MergeError(f"model {artifact.name!r} ({artifact.path}) holds no tensors")
    return MergeInput(artifact.name, Path(artifact.path), config, tensors)


def _compare(ref: MergeInput, other: MergeInput, role: str) -> None:
    """Raise when ``other`` cannot be merged with ``ref`` (``role``: "base" or "first model")."""
    if not _same_architecture(ref.config, other.config):
        raise MergeError(f"model {other.name!r} is {_describe(other.config)} but {role} "
                         f"{ref.name!r} is {_describe(ref.config)}; models of different architectures cannot be merged")
    missing = [n for n in ref.tensors if n not in other.tensors]
    if missing:
        raise MergeError(f"model {other.name!r} lacks tensor(s) {_listing(missing)} that "
                         f"{role} {ref.name!r} has")
    extra = [n for n in other.tensors if n not in ref.tensors]
    if extra:
        raise MergeError(f"model {other.name!r} has tensor(s) {_listing(extra)} that "
                         f"{role} {ref.name!r} lacks (merging would drop them)")
    for name, info in ref.tensors.items():
        theirs = other.tensors[name]
        if theirs.shape != info.shape and not _is_vocab_row_change(ref, other, info, theirs):
            raise MergeError(f"tensor {name!r} has shape {list(theirs.shape)} in model "
                             f"{other.name!r} but {list(info.shape)} in {role} {ref.name!r}")
        if info.dtype != theirs.dtype and (info.torch_dtype.is_floating_point
                                           != theirs.torch_dtype.is_floating_point):
            raise MergeError(f"tensor {name!r} is {theirs.dtype} in model {other.name!r} but "
                             f"{info.dtype} in {role} {ref.name!r}; a floating-point tensor "
                             "cannot be merged with an integer one")


def check_merge_inputs(base: ModelArtifact | None, models: Sequence[ModelArtifact]) -> MergePlan:
    """Check that ``models`` (and ``base``) can be merged tensor by tensor.

    Reads config.json and safetensors headers only. Raises :class:`MergeError` naming
    the model and tensor when a tensor is missing or extra, a shape differs, or the
    architectures (``model_type`` and ``architectures``) differ.
    """
    if not models:
        raise MergeError("a merge needs at least one model (recipe key 'models')")
    plan = MergePlan(base=_load(base) if base is not None else None, models=[_load(m) for m in models])
    return _check_plan(plan)


def _check_plan(plan: MergePlan) -> MergePlan:
    """Compare every input with the reference; plan vocabulary rows; check tokenizers."""
    ref = plan.reference
    role = "base" if plan.base is not None else "first model"
    for m in plan.models:
        if m is not ref:
            _compare(ref, m, role)
    for m in [ref, *plan.models]:
        for info in m.tensors.values():
            try:
                info.torch_dtype  # noqa: B018 - raises for a dtype torch cannot hold
            except EngineError as exc:
                raise MergeError(f"model {m.name!r}: {exc}") from None
    every = [*([plan.base] if plan.base else []), *plan.models]
    tokenizer_from = check_tokenizers([(m.name, token_ids(m.path)) for m in every])
    sizes = {m.name: v for m in every if (v := _vocab_size(m)) is not None}
    if len(sizes) == len(every):
        vocab_tensors = {n for n, info in ref.tensors.items()
                         if any(m.tensors[n].shape != info.shape for m in every)}
        plan.vocab = plan_vocab(sizes, plan.base.name if plan.base else None, vocab_tensors,
                                tokenizer_from)
    return plan


def check_merge_paths(base: tuple[str, Path | None] | None,
                      models: Sequence[tuple[str, Path | None]]) -> MergePlan | None:
    """``engine validate``'s header check: the inputs whose folders exist already
    (``None`` paths -- outputs of earlier stages -- are skipped) are loaded from
    config.json and safetensors headers and compared as :func:`check_merge_inputs`
    does. Returns the plan of what could be checked (None when fewer than two inputs)."""
    known_base = _load(ModelArtifact(base[0], base[1])) if base and base[1] is not None else None
    known = [_load(ModelArtifact(n, p)) for n, p in models if p is not None]
    if len(known) + (known_base is not None) < 2 or not known:
        return None
    return _check_plan(MergePlan(base=known_base, models=known))
