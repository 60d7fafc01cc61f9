"""Layer gradients: a merge param written as a list of numbers varies across the layers.

mergekit's convention, which lingoforge follows: ``t: [0, 0.5, 1]`` spreads its anchors
evenly over the decoder layers. Layer ``i`` of ``n`` sits at position ``x = i / (n - 1)``
(``x = 1`` for a model of one layer) and gets the piecewise-linear interpolation of the
anchors there: with ``k`` anchors, ``s = x (k - 1)``, ``j = floor(s)``, the value is
``(1 - (s - j)) a[j] + (s - j) a[min(j + 1, k - 1)]``. Tensors outside the decoder
layers (embeddings, the final norm, the LM head) get the first anchor, as in mergekit.

A gradient may stand wherever the method's ``Params`` declares the field with
:class:`Gradient` (``weight``, ``density``, per-model ranges such as ``gamma`` and
``epsilon``, slerp's ``t``), inside a per-model dict (``weight: {a: [1, 0], b: [0, 1]}``)
and inside an ``overrides`` entry (``{match: self_attn, t: [0, 0.5, 0.3, 0.7, 1]}``).
:class:`~engine.merging.method.MergeMethod` resolves it per layer before the arithmetic
sees it, so a method's ``merge`` always gets plain numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.core.errors import MergeError

__all__ = ["Gradient", "gradient_fields", "gradient_positions", "has_gradient", "interpolate",
           "layer_count", "layer_index", "layer_position", "value_at"]

#: a decoder layer's tensor: everything up to the layer list, the index, the rest
_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|block)\.(\d+)\.")
#: config.json keys that hold the number of layers (the first one present counts)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Gradient:
    """Marks a field as accepting a layer gradient (``Annotated[..., Gradient()]``): a
    list of numbers, interpolated across the decoder layers."""


def is_anchor_list(value: Any) -> bool:
    """Whether ``value`` is a gradient: a list (or tuple) of numbers."""
    return (isinstance(value, list | tuple) and len(value) > 0
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))


def has_gradient(value: Any) -> bool:
    """Whether ``value``, or any value of a per-model dict, is a gradient."""
    if isinstance(value, Mapping):
        return any(is_anchor_list(v) for v in value.values())
    return is_anchor_list(value)


def interpolate(anchors: Iterable[float], x: float) -> float:
    """The anchors spread evenly over [0, 1], linearly interpolated at ``x``."""
    a = [float(v) for v in anchors]
    s = min(max(x, 0.0), 1.0) * (len(a) - 1)
    j = min(int(math.floor(s)), len(a) - 1)
    frac = s - j
    return (1 - frac) * a[j] + frac * a[min(j + 1, len(a) - 1)]


def value_at(value: Any, x: float) -> Any:
    """``value`` with every gradient in it evaluated at position ``x``."""
    if isinstance(value, Mapping):
        return {k: value_at(v, x) for k, v in value.items()}
    return interpolate(value, x) if is_anchor_list(value) else value


def layer_position(layer: int, n_layers: int) -> float:
    """Where layer ``layer`` of ``n_layers`` sits on a gradient (mergekit's ``t``)."""
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    hit = _LAYER.match(tensor_name)
    return int(hit.group(1)) if hit else None


def layer_count(configs: Iterable[Mapping[str, Any]]) -> int | None:
    """The number of decoder layers the first of ``configs`` (config.json dicts) declares."""
    for cfg in configs:
        for cfg_level in (cfg, cfg.get("text_config") or {}):
            for key in LAYER_COUNT_KEYS:
                if isinstance(cfg_level.get(key), int):
                    return int(cfg_level[key])
    return None


def gradient_fields(params_type: type) -> list[str]:
    """The fields of a ``Params`` class declared with :class:`Gradient`."""
    return [name for name, info in params_type.model_fields.items()  # type: ignore[attr-defined]
            if any(isinstance(m, Gradient) for m in info.metadata)]


def gradient_positions(values: Mapping[str, Any], n_layers: int | None) -> list[float]:
    """The positions at which ``values`` (field -> value) must be evaluated: one per
    decoder layer when the layer count is known; otherwise each anchor's own position
    (enough to check every anchor). Empty when no value is a gradient."""
    lengths = [len(v) for value in values.values()
               for v in (value.values() if isinstance(value, Mapping) else [value])
               if is_anchor_list(v)]
    if not lengths:
        return []
    if n_layers is not None:
        return [layer_position(i, n_layers) for i in range(n_layers)]
    k = max(lengths)
    return [i / (k - 1) if k > 1 else 0.0 for i in range(k)]


def refuse_gradient(value: Any, field: str) -> None:
    """A clear error for a gradient where only plain numbers can be used."""
    if has_gradient(value):
        raise MergeError(f"params.{field} is a layer gradient (a list), which this merge "
                         "cannot spread over layers: only MergeMethod plugins resolve gradients "
                         "(docs/merging.md, layer gradients)")
