"""Pre-flight checks of merge inputs: config.json and safetensors headers, no tensor data.

A merge that fails on tensor 290 of 291 after twenty minutes wastes the user's time;
everything that can be known from headers is checked before the first tensor is read,
and every error names the model and the tensor at fault.

:func:`check_static` is ``engine validate``'s check of a merge: the same checks from
config.json (and headers, where the folders exist), plus the per-model params and weight
sums, before any stage runs.

A merge input may also be a PEFT LoRA adapter folder (:mod:`engine.merging.lora`): it
stands for its base plus the LoRA delta, so its :class:`MergeInput` carries the base's
config and tensor headers (plus the checked adapter) and the rest of the plan treats it
as a model of the base's shapes and vocabulary. An adapter needs the merge's base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core.artifacts import ModelArtifact
from engine.core.errors import EngineError, MergeError
from engine.merging.gradients import gradient_positions, layer_count, value_at
from engine.merging.inputs import MergeInput, MergePlan
from engine.merging.lora import check_adapter, is_adapter_folder, read_adapter
from engine.merging.overrides import resolve_overrides
from engine.merging.params import ExecutionParams, check_weight_sum, resolve_per_model
from engine.merging.reads import peek
from engine.merging.vocab import check_tokenizers, plan_vocab, token_ids
from engine.models import modelio
from engine.models.layout import TensorInfo
from engine.models.tensorio import read_tensor_infos

__all__ = ["MergeInput", "MergePlan", "check_configs", "check_merge_inputs", "check_merge_paths",
           "check_static"]

_SHOW = 5  # names listed in an error before "and N more"


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


def _load(artifact: ModelArtifact, base: MergeInput | None = None, *,
          role: str = "model") -> MergeInput:
    """Headers of one input; an adapter folder is checked against ``base`` (a merge
    input ``role`` "base" may not be an adapter)."""
    if is_adapter_folder(artifact.path):
        return _load_adapter(artifact, base, role)
    try:
        config = modelio.check_model_folder(artifact.path)
        tensors = read_tensor_infos(artifact.path)
    except EngineError as exc:
        raise MergeError(f"model {artifact.name!r}: {exc}") from None
    if not tensors:
        raise MergeError(f"model {artifact.name!r} ({artifact.path}) holds no tensors")
    return MergeInput(artifact.name, Path(artifact.path), config, tensors)


def _load_adapter(artifact: ModelArtifact, base: MergeInput | None, role: str) -> MergeInput:
    where = f"model {artifact.name!r} ({artifact.path})"
    if role == "base":
        raise MergeError(f"{where} is a LoRA adapter folder and cannot be the merge base; give "
                         "the model it was trained on as base and the adapter as a model")
    if base is None:
        raise MergeError(f"{where} is a LoRA adapter, a delta on a base model: a merge with an "
                         "adapter needs a base (recipe key 'base', engine merge --base); linear "
                         "without a base cannot take adapters")
    try:
        adapter = read_adapter(artifact.path)
    except EngineError as exc:
        raise MergeError(f"model {artifact.name!r}: {exc}") from None
    check_adapter(adapter, artifact.name, base.name, base.path, base.tensors)
    return MergeInput(artifact.name, Path(artifact.path), dict(base.config), dict(base.tensors),
                      adapter=adapter)


def _token_ids(m: MergeInput, base: MergeInput | None) -> dict[str, int] | None:
    """An input's tokenizer; an adapter has its base's (a tokenizer.json saved beside the
    adapter must be the base's)."""
    ids = token_ids(m.path)
    if m.adapter is None or base is None:
        return ids
    base_ids = token_ids(base.path)
    if ids is not None and base_ids is not None and ids != base_ids:
        raise MergeError(f"model {m.name!r} ({m.path}) is a LoRA adapter whose tokenizer.json "
                         f"differs from base {base.name!r}'s; an adapter merges on its base's "
                         "vocabulary (resized vocabularies cannot be merged as adapters)")
    return base_ids if base_ids is not None else ids


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
    base_input = _load(base, role="base") if base is not None else None
    plan = MergePlan(base=base_input, models=[_load(m, base_input) for m in models])
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
    tokenizer_from = check_tokenizers([(m.name, _token_ids(m, plan.base)) for m in every])
    # keyed by name: the base may also be listed among the models (same name, same
    # folder), so "every input has a vocab_size" is asked of the inputs, not the keys
    sizes = {m.name: v for m in every if (v := _vocab_size(m)) is not None}
    if all(_vocab_size(m) is not None for m in every):
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
    does. Returns the plan of what could be checked (None when fewer than two inputs).

    A LoRA adapter folder is checked against the base when the base's folder exists,
    and skipped (checked when the merge runs) when it does not yet; without any base
    it is an error."""
    known_base = (_load(ModelArtifact(base[0], base[1]), role="base")
                  if base and base[1] is not None else None)
    known = []
    for n, p in models:
        if p is None or (base is not None and known_base is None and is_adapter_folder(p)):
            continue
        known.append(_load(ModelArtifact(n, p), known_base))
    if len(known) + (known_base is not None) < 2 or not known:
        return None
    return _check_plan(MergePlan(base=known_base, models=known))


def _check_headers(configs: Mapping[str, Any]) -> None:
    """With folder paths (``InputConfigs.paths``), run the full header pre-flight on the
    inputs that exist already: missing/extra tensors, shapes, dtypes, truncated shards,
    tokenizers -- everything :func:`~engine.merging.preflight.check_merge_inputs`
    checks, without reading tensor data."""
    paths = getattr(configs, "paths", None) or {}
    names = getattr(configs, "names", None) or {}
    if not paths.get("models"):
        return
    base = None
    if names.get("base"):
        base = (names["base"][0], (paths.get("base") or [None])[0])
    check_merge_paths(base, list(zip(names.get("models", []), paths["models"])))


def check_static(configs: Mapping[str, Any], params: ExecutionParams) -> list[str]:
    """``engine validate``'s check for a merge: architectures agree (config.json only),
    per-model params name only merged models, normalised weights do not sum to zero.

    ``configs`` is the :class:`engine.api.InputConfigs` the validator passes; returns the
    names of the merged models (empty when unknown).
    """
    check_configs(configs)
    onto = params.__dict__.get("tokenizer")
    if onto is None:
        _check_headers(configs)
    else:  # the inputs' tokenizers and vocabulary rows differ until the merge gives them one
        every = [*getattr(configs, "names", {}).get("base", []), *getattr(configs, "names", {}).get("models", [])]
        if every and onto.model not in every:
            raise MergeError(f"params.tokenizer.model: {onto.model!r} is not an input of the merge "
                             f"(inputs: {', '.join(every)})")
    names = list(getattr(configs, "names", {}).get("models", []))
    if not names:
        return names
    n_layers = layer_count([*configs.get("base", []), *configs.get("models", [])])
    for p in [params, *(p for _, p in resolve_overrides(params))]:
        found = {f: peek(p, f) for f in ("weight", "density") if f in type(p).model_fields}
        # a gradient: at every layer (every anchor when the layer count is unknown)
        for i, x in enumerate(gradient_positions(found, n_layers) or [0.0]):
            try:
                weights = resolve_per_model(value_at(peek(p, "weight", 1.0), x), names, "weight")
                if "density" in found:
                    resolve_per_model(value_at(found["density"], x), names, "density")
                check_weight_sum(weights, names, normalize=bool(peek(p, "normalize", False)))
            except MergeError as exc:
                if not gradient_positions(found, n_layers):
                    raise
                at = f"layer {i}" if n_layers is not None else f"gradient position {x:g}"
                raise MergeError(f"at {at}: {exc}") from None
    return names
