"""Architecture access for Llama-family decoder stacks.

Layer-wise methods (ELO, layer selection, training a few layers inside a full model)
need to reach the decoder layers, the embeddings, the final norm and the head, and to
build a *detached sub-model* that holds only some layers. Every supported model type
lays these out the same way (``model.embed_tokens``, ``model.layers.<i>``,
``model.norm``, ``lm_head``), so one small table covers them; an unknown type is an
error rather than a silent guess, because a wrong guess would train the wrong weights.

A detached sub-model is an ordinary, smaller model of the same class: its config is the
source config with ``num_hidden_layers`` (and ``layer_types``) cut down to the chosen
layers, and its layer ``j`` holds source layer ``indices[j]``. :func:`load_submodel`
builds it on the meta device and reads only the tensors it needs from the source's
safetensors, so the middle layers of a large model are never materialised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.core.errors import TrainingError
from engine.models import modelio

#: model_type values whose decoder stack is laid out as described above
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
)

#: state-dict prefix of decoder layer ``i`` is ``LAYER_PREFIX + f"{i}."``
LAYER_PREFIX = "model.layers."
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class LayerIndexError(TrainingError, ValueError):
    """A layer index is out of range or repeated.

    It is a :class:`TrainingError` for the runner and a :class:`ValueError` for the
    recipe validator, which expects ``check`` methods to raise the latter.
    """


# --- configs -----------------------------------------------------------------------


def _as_dict(config: Any) -> dict[str, Any]:
    return config if isinstance(config, Mapping) else config.to_dict()


def check_supported(config: Any) -> str:
    """The config's ``model_type``, or a :class:`TrainingError` naming the supported ones."""
    model_type = _as_dict(config).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TrainingError(
            f"layer-wise training does not support model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def num_layers(config: Any) -> int:
    """Decoder layer count from a config object or a config.json dict."""
    n = _as_dict(config).get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise TrainingError(f"config has no valid 'num_hidden_layers' (got {n!r})")
    return n


def resolve_indices(indices: Iterable[int], n_layers: int, *, what: str = "layer index") -> list[int]:
    """Normalise layer indices: negatives count from the end; result sorted and unique.

    Out-of-range and repeated indices raise :class:`LayerIndexError` naming the index
    and the layer count, because training a layer other than the one meant is a
    silent, expensive mistake.
    """
    seen: dict[int, int] = {}
    for raw in indices:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise LayerIndexError(f"{what} {raw!r} is not an integer")
        idx = raw + n_layers if raw < 0 else raw
        if not 0 <= idx < n_layers:
            raise LayerIndexError(
                f"{what} {raw} is out of range: the model has {n_layers} decoder layers "
                f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)"
            )
        if idx in seen:
            raise LayerIndexError(f"{what} {raw} names layer {idx} again (already given as {seen[idx]})")
        seen[idx] = raw
    if not seen:
        raise LayerIndexError(f"no layers selected ({what} list is empty)")
    return sorted(seen)


def choose_layers(explicit: Sequence[int] | None, selection: Any, n_layers: int) -> list[int] | None:
    """Layers a trainer was asked to train: its ``layers`` param or a select-layers
    stage's :class:`~engine.api.LayerSelection` (not both); None when neither is given."""
    if explicit is not None and selection is not None:
        raise TrainingError(f"layers are given twice: params.layers={list(explicit)} and the "
                            f"'layers' input {selection.name!r}; keep one")
    if selection is not None:
        if selection.num_layers != n_layers:
            raise TrainingError(f"layer selection {selection.name!r} was made for a model with "
                                f"{selection.num_layers} layers, this model has {n_layers}")
        return resolve_indices(selection.indices, n_layers, what=f"layer index (from {selection.name!r})")
    if explicit is not None:
        return resolve_indices(explicit, n_layers)
    return None


def submodel_config(config: Any, indices: Sequence[int]) -> Any:
    """The config of a detached sub-model holding source layers ``indices`` in order.

    Same class and settings as the source; ``num_hidden_layers`` becomes
    ``len(indices)`` and per-layer lists (``layer_types``: full vs sliding attention)
    keep the entries of the chosen layers, so each kept layer behaves as it did.
    """
    from transformers import AutoConfig

    check_supported(config)
    n = num_layers(config)
    idx = resolve_indices(indices, n)
    data = dict(_as_dict(config))
    data["num_hidden_layers"] = len(idx)
    layer_types = data.get("layer_types")
    if isinstance(layer_types, list):
        if len(layer_types) != n:
            raise TrainingError(f"config 'layer_types' has {len(layer_types)} entries for {n} layers")
        data["layer_types"] = [layer_types[i] for i in idx]
    if isinstance(config, Mapping):
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    return type(config).from_dict(data)


# --- modules of a loaded model -----------------------------------------------------------


def _decoder(model: nn.Module) -> nn.Module:
    check_supported(model.config)
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TrainingError(f"{type(model).__name__}: expected a causal LM with .model.layers")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``model.model.layers``)."""
    return _decoder(model).layers


def embeddings(model: nn.Module) -> nn.Module:
    """The input token embedding."""
    return _decoder(model).embed_tokens


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer."""
    return _decoder(model).norm


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection to the vocabulary (may share its weight with the embedding)."""
    _decoder(model)
    return model.lm_head


def model_num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def train_only_layers(model: nn.Module, indices: Sequence[int]) -> list[int]:
    """Freeze every parameter except those of decoder layers ``indices``; return them resolved."""
    layers = decoder_layers(model)
    idx = resolve_indices(indices, len(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    for i in idx:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    return idx


def layer_module_names(indices: Iterable[int]) -> list[str]:
    """Module names of decoder layers ``indices`` (``model.layers.<i>``), e.g. to keep
    them out of 8-bit quantisation."""
    return [f"{LAYER_PREFIX}{i}" for i in indices]


def check_int8_split(model: nn.Module, trained: Sequence[int]) -> int:
    """Check that the decoder layers ``trained`` hold no 8-bit linear layer and every
    other decoder layer's linear layers are 8-bit; return the number of 8-bit modules.

    Guards the ``frozen_8bit`` promise (the trained layers learn in full precision)
    against a quantiser that matched module names differently than asked.
    """
    chosen = set(trained)
    quantised = 0
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            is_int8 = type(module).__name__ == "Linear8bitLt"
            is_linear = is_int8 or isinstance(module, nn.Linear)
            if not is_linear:
                continue
            if i in chosen and is_int8:
                raise TrainingError(f"{LAYER_PREFIX}{i}.{name} was quantised to 8 bits but layer {i} trains")
            if i not in chosen and not is_int8:
                raise TrainingError(f"{LAYER_PREFIX}{i}.{name} (frozen) was not quantised to 8 bits")
            quantised += is_int8
    return quantised


# --- state-dict keys -----------------------------------------------------------------------


def layer_of_key(key: str) -> int | None:
    """The decoder layer index a state-dict key belongs to, or None (embeddings, norm, head)."""
    m = _LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


def rename_layer_key(key: str, mapping: Mapping[int, int]) -> str | None:
    """``key`` with its layer index mapped through ``mapping``; None if the layer is not mapped.

    Keys outside the decoder layers are returned unchanged.
    """
    m = _LAYER_KEY.match(key)
    if not m:
        return key
    new = mapping.get(int(m.group(1)))
    return None if new is None else f"{LAYER_PREFIX}{new}.{m.group(2)}"


def _tied_keys(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = getter() if callable(getter) else getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


# --- detached sub-models --------------------------------------------------------------------


def load_submodel(source: Path, indices: Sequence[int], *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, list[int]]:
    """Build ``embed -> layers[indices] -> norm -> lm_head`` from a model folder.

    The sub-model is created on the meta device (no memory, no random init) and
    filled from the source safetensors with ``safe_open``, reading only the
    embeddings, final norm, head and the chosen layers, renamed to ``0..k-1``. Returns
    the model and the resolved source indices. Tensors the sub-model needs but the
    folder lacks are an error naming them.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(source)
    full_config = AutoConfig.from_pretrained(str(source))
    idx = resolve_indices(indices, num_layers(full_config))
    sub_config = submodel_config(full_config, idx)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(sub_config, dtype=dtype)

    mapping = {src: j for j, src in enumerate(idx)}
    state: dict[str, torch.Tensor] = {}
    for file in modelio.weight_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                new = rename_layer_key(key, mapping)
                if new is not None:
                    state[new] = fh.get_tensor(key).to(device=device, dtype=dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - _tied_keys(model))
    if missing:
        raise TrainingError(f"{source}: tensors needed by the sub-model are missing: {missing[:8]}")
    if result.unexpected_keys:
        raise TrainingError(f"{source}: unexpected tensors for {type(model).__name__}: "
                            f"{sorted(result.unexpected_keys)[:8]}")
    model.tie_weights()
    _materialise_buffers(model, device)
    return model, idx


def _materialise_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers (RoPE frequencies) are not in the checkpoint: compute them."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            if any(b.is_meta for b in module.buffers(recurse=False)):
                raise TrainingError(f"could not initialise buffers of module {name!r}")
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise TrainingError(f"sub-model parameters left uninitialised: {leftovers[:8]}")
