"""Merge methods that cannot drop a parameter: the engine applies the params, the method
writes the arithmetic on one tensor (mergekit's ``tensor_parameters`` idea).

A method subclasses :class:`MergeMethod`, declares ``name`` and ``Params`` and writes
:meth:`MergeMethod.merge`; the engine does everything between the recipe and that call:

* resolves per-model params (``weight``, ``density``, ... declared with
  :class:`~engine.merging.params.PerModel`) from one number or ``{model: number}``
  into one value per model, in model order;
* picks each tensor's params (the first ``overrides`` entry whose ``match`` finds the
  tensor name; those params are what the arithmetic sees for that tensor), and
  evaluates layer gradients (:mod:`engine.merging.gradients`) at the tensor's layer;
* checks weight sums when ``normalize`` divides by them;
* trims each task vector to the magnitude band :meth:`MergeMethod.bands` asks for;
* streams large tensors in row slices when the method is ``positionwise``;
* refuses, in :meth:`MergeMethod.check` (``engine validate``) and again before a run,
  any declared param the arithmetic never reads: each set of params is run once through
  :meth:`~MergeMethod.bands` and :meth:`~MergeMethod.merge` on a small probe tensor, and
  a field neither of them read would be silently ignored.

docs/merging.md ("Writing a merge method") states the contract of ``merge``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.core.artifacts import ModelArtifact
from engine.core.errors import MergeError
from engine.core.inputs import StageInputs
from engine.merging.counts import check_model_count, probe_count
from engine.merging.execute import execute_merge
from engine.merging.gradients import (
    gradient_fields,
    gradient_positions,
    layer_count,
    layer_index,
    value_at,
)
from engine.merging.overrides import EXECUTION_FIELDS, resolve_overrides
from engine.merging.params import (
    ExecutionParams,
    MergeParams,
    check_weight_sum,
    per_model_fields,
    resolve_per_model,
)
from engine.merging.preflight import check_static
from engine.merging.streaming import Positionwise, PositionwiseMerge
from engine.merging.trims import MagnitudeBand, band_trim_
from engine.run.context import StageContext

__all__ = ["MergeMethod", "ResolvedParams", "TensorSlice"]


@dataclass(frozen=True)
class TensorSlice:
    """Where the rows :meth:`MergeMethod.merge` gets come from.

    ``name`` is the tensor's name, ``shape`` one model's whole tensor (rows limited to
    the common vocabulary when vocabularies differ), ``[start, stop)`` the rows at hand
    (the whole tensor: ``start == 0`` and ``stop == shape[0]``; a 0-d tensor is one
    row). ``tally`` is one counter for the whole run: add counts to it (they add up over
    slices and tensors) and read them in :meth:`MergeMethod.report`.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    tally: Counter

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == (self.shape[0] if self.shape else 1)


class ResolvedParams:
    """One set of a method's params as its arithmetic sees them: every field of
    ``Params`` except the execution ones, per-model fields as tuples in model order
    (``p.weight[i]`` is model ``i``'s weight), the others as validated; ``p.names`` are
    the merged models. Reading an attribute records it (see :attr:`reads`)."""

    def __init__(self, values: dict[str, Any], names: Sequence[str], where: str) -> None:
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_reads", set())
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "where", where)  # "params" or "overrides[i] (match ...)"

    def __getattr__(self, field: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if field not in values:
            raise AttributeError(f"{self.where} has no field {field!r} (declared: "
                                 f"{sorted(values)})")
        object.__getattribute__(self, "_reads").add(field)
        return values[field]

    def __setattr__(self, field: str, value: Any) -> None:
        raise AttributeError("resolved params are read-only")

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(object.__getattribute__(self, "_values"))

    @property
    def reads(self) -> set[str]:
        """The fields read so far."""
        return object.__getattribute__(self, "_reads")

    def peek(self, field: str) -> Any:
        """A value read by the engine (not recorded as the arithmetic reading it)."""
        return object.__getattribute__(self, "_values")[field]


#: attribute names of ResolvedParams itself, which no method param may take
_RESERVED = frozenset({"names", "where", "fields", "reads", "peek"})


#: a family of resolved params: None for tensors outside the layers, else a layer index
Family = dict[int | None, "ResolvedParams"]


def _resolve(params: ExecutionParams, names: Sequence[str], where: str, x: float = 0.0
             ) -> ResolvedParams:
    """``params`` resolved per model, its layer gradients evaluated at position ``x``."""
    per_model = set(per_model_fields(type(params)))
    layered = set(gradient_fields(type(params)))
    values: dict[str, Any] = {}
    prefix = "" if where == "params" else f"{where}: "
    for field, info in type(params).model_fields.items():
        if field in EXECUTION_FIELDS:
            continue
        if field in _RESERVED:
            raise MergeError(f"{type(params).__qualname__} declares a param named {field!r}, "
                             f"which MergeMethod reserves ({sorted(_RESERVED)}); rename it")
        value = params.__dict__[field]
        if field in layered:
            value = value_at(value, x)
        if field in per_model:
            default = info.default if isinstance(info.default, int | float) else 1.0
            try:
                value = tuple(resolve_per_model(value, names, info.alias or field, default))
            except MergeError as exc:
                raise MergeError(f"{prefix}{exc}") from None
        values[field] = value
    return ResolvedParams(values, names, where)


def _family(params: ExecutionParams, names: Sequence[str], where: str, n_layers: int | None) -> Family:
    """``params`` resolved for tensors outside the layers (key None: a gradient's first
    anchor) and, when a param is a layer gradient, for each layer (at each anchor's
    position, under negative keys no tensor has, when the layer count is unknown)."""
    family: Family = {None: _resolve(params, names, where)}
    values = {f: params.__dict__[f] for f in gradient_fields(type(params))}
    for i, x in enumerate(gradient_positions(values, n_layers)):
        key, at = (i, f"layer {i}") if n_layers is not None else (-1 - i, f"gradient position {x:g}")
        family[key] = _resolve(params, names, f"{where} at {at}", x)
    return family


def _input_layers(inputs: StageInputs) -> int | None:
    """The number of decoder layers of the merge's inputs (config.json), if any says."""
    configs = []
    for m in [*([inputs.base] if inputs.base else []), *inputs.models]:
        path = Path(m.path) / "config.json"
        if path.is_file():
            configs.append(json.loads(path.read_text()))
    return layer_count(configs)


class _MethodStep(Positionwise):
    """A :class:`MergeMethod`'s step for one set of params, as the engine runs it."""

    def __init__(self, method: MergeMethod, p: ResolvedParams,
                 bands: tuple[MagnitudeBand | None, ...] | None, tally: Counter) -> None:
        object.__setattr__(self, "fn", None)
        object.__setattr__(self, "densities", None)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "_call", lambda stacked, where: method.merge(stacked, p, where))
        object.__setattr__(self, "_tally", tally)

    def apply(self, stacked: torch.Tensor, name: str, start: int, stop: int,
              shape: tuple[int, ...]) -> torch.Tensor:
        where = TensorSlice(name, tuple(shape), start, stop, self._tally)  # type: ignore[attr-defined]
        return self._call(stacked, where)  # type: ignore[attr-defined]


class MergeMethod:
    """Base class of a merge method: declare ``name`` and ``Params``, write :meth:`merge`.

    Class attributes, each documented where it is declared (and in docs/api-reference.md,
    with its default): ``name``, ``Params``, ``task_vectors``, ``positionwise``,
    ``min_models``, ``max_models``.

    Optional hooks: :meth:`bands` (the engine's magnitude trim), :meth:`check_params`
    (extra checks of resolved params), :meth:`report` (what goes to lingoforge.json).
    The base provides :meth:`check` and :meth:`run` (the stage implementation).
    """

    name: ClassVar[str]
    """The recipe's ``plugin:`` value (required)."""
    Params: ClassVar[type[ExecutionParams]] = MergeParams
    """The recipe keys under ``params:``: a subclass of ``MergeParams`` (``weight`` and the
    execution params), or of ``ExecutionParams`` for a method without model weights."""
    task_vectors: ClassVar[bool] = True
    """True: :meth:`merge` gets task vectors ``model - base`` (a base is required) and
    returns a delta, which the engine adds to the base. False: it gets the models' own
    tensors and returns the merged tensor, written as is; the base is optional and, if
    given, supplies tensor names, config, tokenizer and output dtypes, never values.
    Either way :meth:`merge` never sees the base tensor."""
    positionwise: ClassVar[bool] = True
    """True: each output entry depends only on the same entry of the inputs (after the
    engine's trim), so the engine may call :meth:`merge` on row slices of large tensors
    (``tensor.start:tensor.stop``). False: :meth:`merge` always gets whole tensors (an
    angle, a norm or a random mask over the whole tensor)."""
    min_models: ClassVar[int] = 1
    """The fewest models (recipe key ``models``, the base not counted) the method merges;
    ``engine validate`` and the run refuse fewer, naming the method. Model Stock: 2."""
    max_models: ClassVar[int | None] = None
    """The most models it merges (None: no limit); ``engine validate`` and the run refuse
    more. slerp: ``min_models = max_models = 2``. The conformance suite merges as many
    models as the method takes (three when it can, else the nearest count it allows)."""

    # --- what a method writes -----------------------------------------------------------

    def merge(self, stacked: torch.Tensor, p: ResolvedParams, tensor: TensorSlice) -> torch.Tensor:
        """Merge one tensor, or rows ``tensor.start:tensor.stop`` of it.

        ``stacked`` is ``[m, rows, ...]`` (model order as ``p.names``), in the compute
        dtype on the compute device, task vectors already trimmed to :meth:`bands`; the
        method may modify it. Return ``[rows, ...]`` (a delta for task-vector methods)."""
        raise NotImplementedError(f"{type(self).__name__} must define merge()")

    def bands(self, p: ResolvedParams) -> Sequence[MagnitudeBand | None] | None:
        """The magnitude band each model's task vector is trimmed to before :meth:`merge`
        (None: no trim). The engine trims exactly, whole or in slices."""
        return None

    def check_params(self, p: ResolvedParams) -> None:
        """Refuse resolved params that cannot work (raise :class:`MergeError`; the engine
        prefixes where they come from). Reads here do not count as the arithmetic's."""

    def report(self, context: StageContext, params: ExecutionParams, names: Sequence[str],
               tally: Counter) -> dict[str, Any]:
        """Called once after every tensor is merged; the returned dict is stored under
        ``merge`` in lingoforge.json. May add notes with ``context.note``."""
        return {}

    # --- what the engine does -----------------------------------------------------------

    def _variants(self, params: ExecutionParams, names: Sequence[str], n_layers: int | None = None
                  ) -> list[tuple[re.Pattern[str] | None, Family]]:
        """Plain params and each override, resolved (per layer where a param is a layer
        gradient; at each anchor when ``n_layers`` is unknown), checked and probed."""
        check_model_count(self, names)
        out: list[tuple[re.Pattern[str] | None, Family]] = [
            (None, _family(params, names, "params", n_layers))]
        for i, (pattern, p) in enumerate(resolve_overrides(params)):
            where = f"overrides[{i}] (match {params.overrides[i].match!r})"
            out.append((pattern, _family(p, names, where, n_layers)))
        for _, family in out:
            for p in family.values():
                self._check_resolved(p)
        return out

    def _check_resolved(self, p: ResolvedParams) -> None:
        prefix = "" if p.where == "params" else f"{p.where}: "
        if "weight" in p.fields:
            try:
                check_weight_sum(p.peek("weight"), p.names,
                                 normalize=bool("normalize" in p.fields and p.peek("normalize")))
            except MergeError as exc:
                raise MergeError(f"{prefix}{exc}") from None
        try:
            self.check_params(p)
        except (MergeError, ValueError) as exc:
            raise MergeError(f"{prefix}{exc}") from None
        self._probe(p)

    def _probe(self, p: ResolvedParams) -> None:
        """Run the arithmetic once on a small tensor and refuse fields it never read."""
        m = len(p.names)
        if m == 0:
            return
        values = torch.linspace(-1.0, 1.0, m * 32, dtype=torch.float32)
        stacked = values[torch.randperm(m * 32, generator=torch.Generator().manual_seed(0))]
        stacked = stacked.reshape(m, 4, 8).contiguous()
        p.reads.clear()
        try:
            bands = self.bands(p)
            if bands is not None:
                for delta, band in zip(stacked, bands):
                    if band is not None:
                        band_trim_(delta, *band.ranks(delta.numel()))
            out = self.merge(stacked, p, TensorSlice("<probe>", (4, 8), 0, 4, Counter()))
        except Exception as exc:
            raise MergeError(f"merge method {self.name!r} failed on a probe tensor of shape "
                             f"[{m}, 4, 8] with {p.where}: {type(exc).__name__}: {exc}") from exc
        if tuple(out.shape) != (4, 8):
            raise MergeError(f"merge method {self.name!r} returned shape {list(out.shape)} for "
                             "a probe tensor of 4 x 8 (merge() must return one model's rows)")
        unread = sorted(p.fields - p.reads)
        if unread:
            fields = type(self).Params.model_fields
            shown = ", ".join(f"params.{fields[f].alias or f}" for f in unread)
            raise MergeError(
                f"merge method {self.name!r} declares {shown} but its arithmetic (bands() and "
                f"merge()) never reads {'it' if len(unread) == 1 else 'them'}: a recipe value "
                "would be silently ignored. The method must read every declared param, or "
                "not declare it")
        p.reads.clear()

    def declaration_problems(self) -> list[str]:
        """What the plugin manager checks when the method is registered, before any recipe
        uses it: ``min_models``/``max_models`` are a valid range, no param takes a name
        :class:`ResolvedParams` reserves, and, when ``Params`` builds from its defaults,
        the arithmetic reads every declared param on a probe merge of three models (or the
        nearest count the method takes; a method failing this is reported as a broken
        plugin, naming the param)."""
        try:
            count = probe_count(self)
        except ValueError as exc:
            return [str(exc)]
        fields = type(self).Params.model_fields
        reserved = sorted(set(fields) & _RESERVED)
        if reserved:
            return [f"params {reserved} take names MergeMethod reserves ({sorted(_RESERVED)})"]
        try:
            params = type(self).Params()
        except ValueError:  # required params: checked by engine validate with the recipe's
            return []
        try:
            self._variants(params, [f"model-{chr(ord('a') + i)}" for i in range(count)])
        except MergeError as exc:
            return [str(exc)]
        return []

    def check(self, configs: Any, params: ExecutionParams) -> None:
        """``engine validate``'s check: the header pre-flight on the inputs that exist
        (architectures, tensors, shapes, dtypes, tokenizers), per-model params naming
        only merged models, weight sums, :meth:`check_params`, and that the arithmetic
        reads every declared param, for the plain params and each override."""
        names = check_static(configs, params)
        if names:
            every = [*configs.get("base", []), *configs.get("models", [])]
            self._variants(params, names, layer_count(every))

    def tensor_merge(self, params: ExecutionParams, names: Sequence[str], n_layers: int | None
                     ) -> tuple[PositionwiseMerge, Counter]:
        """Resolve and check ``params`` for models ``names`` and return the per-tensor
        merge ``(tensor name, stacked [m, ...]) -> merged`` (a delta for task-vector
        methods) with the tally :meth:`report` reads. The streamed merge (:meth:`run`) and
        a search's in-memory candidates (:mod:`engine.merging.search`) both merge through it."""
        variants = self._variants(params, names, n_layers)
        tally: Counter = Counter()
        steps = [(pattern, {k: _MethodStep(self, p, self._bands(p), tally) for k, p in family.items()})
                 for pattern, family in variants]

        def select(name: str) -> _MethodStep:
            family = next((f for pattern, f in steps[1:] if pattern is not None and pattern.search(name)),
                          steps[0][1])
            return family[layer_index(name)] if len(family) > 1 and layer_index(name) in family \
                else family[None]

        return PositionwiseMerge(select), tally

    def run(self, context: StageContext, inputs: StageInputs, params: ExecutionParams
            ) -> ModelArtifact:
        """Resolve and check the params, then stream the merge (the stage's ``run``)."""
        names = [m.name for m in inputs.models]
        if not names:
            raise MergeError(f"{self.name} needs at least one model (recipe key 'models')")
        whole, tally = self.tensor_merge(params, names, _input_layers(inputs))
        merge: Callable[[str, torch.Tensor], torch.Tensor]
        if self.positionwise:
            merge = whole
        else:
            merge = lambda name, stacked: whole(name, stacked)  # noqa: E731 - never sliced
        return execute_merge(context, inputs, params, merge, task_vectors=self.task_vectors,
                             meta=lambda: self.report(context, params, names, tally))

    def _bands(self, p: ResolvedParams) -> tuple[MagnitudeBand | None, ...] | None:
        bands = self.bands(p)
        if bands is None:
            return None
        bands = tuple(bands)
        if len(bands) != len(p.names):
            raise MergeError(f"merge method {self.name!r} gave {len(bands)} bands for "
                             f"{len(p.names)} models")
        return bands
