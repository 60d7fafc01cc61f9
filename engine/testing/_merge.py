"""Conformance of merge methods (called through :mod:`engine.testing.conformance`)."""

from __future__ import annotations

import tempfile
import typing
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from engine.core.artifacts import ModelArtifact
from engine.core.inputs import StageInputs
from engine.core.stages import MERGE
from engine.merging.counts import model_count
from engine.merging.overrides import EXECUTION_FIELDS
from engine.testing._checks import (
    Checker,
    ConformanceReport,
    changed_tensors,
    check_params_contract,
    loads_as_model,
    model_state,
    quiet_context,
    single_thread,
)
from engine.testing._instrument import (
    _MISSING,
    READ_BOUND,
    SMALL_CHUNK,
    _chunk_elements,
    _count_reads,
    _names,
    _refuse_whole_loaders,
    _same_layout,
    _size,
)
from engine.testing._merge_inputs import Models, choose_models
from engine.testing._search import check_searchable

#: the tensors the override check targets
OVERRIDE_MATCH = r"\.mlp\."
#: merge params the suite does not vary: where the arithmetic runs, not what it computes
NOT_VARIED = {"compute_dtype": "changes rounding only", "device": "where the arithmetic runs",
              "tokenizer": "the runner gives the inputs one tokenizer before the method runs"}
#: the shared params each of which must change every tensor whose inputs differ
SHARED = ("weight", "lambda", "density", "normalize")
#: how many models the suite merges when the method allows it
DEFAULT_MODELS = 3

#: the properties a report may list as skipped, with the reason (ConformanceReport.skipped)
COUNTS = "refuses other model counts"
OVERRIDES = "overrides change only matching tensors"
OVERRIDES_REFUSED = "refuses overrides it cannot apply"


def check_merge_method(impl: Any, *, params: Mapping[str, Any] | None = None,
                       variations: Mapping[str, Any] | None = None,
                       family: Mapping[str, Path] | None = None,
                       models: Models | None = None,
                       workdir: Path | None = None) -> ConformanceReport:
    """Check a merge method on a tiny family: ``base`` and as many models as the method
    merges (three when its ``min_models``/``max_models`` allow, else the nearest count:
    two for slerp).

    ``params`` are the baseline params (default: the defaults); ``variations`` gives, per
    parameter of the method's own, a value to change it to (shared params get values the
    suite chooses; a variation given here wins). ``family`` is ``{"base": folder, name:
    folder, ...}`` (default: the kit's own, :func:`~engine.testing.builders.shared_family`,
    built with as many models as needed); ``models`` chooses the merged models: a count
    (the first of the family's), names of the family's models, or ``{name: folder}``
    (merged onto the family's base). A choice outside the declared count is a
    ``ValueError``. Properties, in order:

    * the params contract (:func:`engine.testing.conformance.check_params`);
    * **declares how many models it merges**: ``min_models`` (default 1) and
      ``max_models`` (default None, no limit) are a valid range;
    * **writes a loadable model** into ``context.output_dir``, returned as a ModelArtifact;
    * **keeps names, shapes and dtypes** of the base's tensors, all finite;
    * **a model merged with itself is itself**: base and every model the same folder
      give that model back (task vectors are zero; an average of equal models is the model);
    * **deterministic**: the same inputs and params give bitwise the same tensors;
    * **streams**: the merge goes through the engine's streaming executor (its summary
      counts every tensor), never calls a whole-model loader, and the tensors read from
      the inputs (the engine's model readers, instrumented) that are alive at once never
      exceed 1.25 times the largest tensor of each input (plus a ``prefetch`` budget);
    * **sliced equals whole**: with a tiny slice size (every matrix merged in row slices
      where the method allows it) the output is bitwise the whole-tensor output;
    * **refuses other model counts**: one model fewer than ``min_models`` (when that is
      at least one) and one more than ``max_models`` (when set) raise an error instead of
      merging; skipped, with the reason in ``report.skipped``, for a method that takes any
      number;
    * **honours every parameter**: each advertised parameter, changed, changes the output:
      ``weight`` (the first model given a majority of the weight), ``lambda``,
      ``normalize``, ``density`` change every tensor whose inputs differ; the method's own
      params (``variations``; booleans are flipped, literals switched) change at least
      one; ``out_dtype`` sets the written dtype; ``shard_size`` splits the output;
      ``prefetch`` and other NOT_IN_RESULT params change nothing;
    * **overrides change only matching tensors**: an override for ``\\.mlp\\.`` tensors of
      the first of ``weight``, ``lambda``, ``density``, ``normalize`` the method has, else
      of the first of its own params whose variation changes such a tensor, gives every
      matching tensor bitwise what that variation gives it everywhere (so it changes
      each one the variation changes) and every other tensor its baseline value. A method
      that cannot apply overrides passes **refuses overrides it cannot apply** instead if
      the merge raises an error naming ``overrides``; a method with nothing to override
      (every param is an execution param) or no ``overrides`` field is listed in
      ``report.skipped`` with the reason.
    """
    c = Checker(impl, MERGE)
    base_params = dict(params or {})
    check_params_contract(c, base_params)
    with c.prop("declares how many models it merges"):
        model_count(impl)
    base, chosen = choose_models(c, family, models, DEFAULT_MODELS)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-merge-")))
        _MergeChecks(c, base, chosen, Path(workdir), base_params, dict(variations or {})).run()
    return c.report


class _MergeChecks:
    def __init__(self, c: Checker, base: Path, models: dict[str, Path], workdir: Path,
                 params: dict[str, Any], variations: dict[str, Any]) -> None:
        self.c, self.base, self.models, self.workdir = c, base, models, workdir
        self.names = list(models)
        self.params, self.variations = params, variations
        self.runs = 0
        #: key -> (value, merged state) of each variation honours() ran
        self.varied: dict[str, tuple[Any, dict[str, Any]]] = {}

    # -- running ---------------------------------------------------------------------------

    def merge(self, params: Mapping[str, Any], *, base: Path | None = None,
              models: Mapping[str, Path] | None = None, chunk: int | None = None,
              guard: bool = False) -> tuple[ModelArtifact, Any]:
        impl = self.c.impl
        self.runs += 1
        context = quiet_context(self.workdir, f"merge-{self.runs}", MERGE, self.c.name)
        models = models if models is not None else self.models
        inputs = StageInputs(base=ModelArtifact("base", base or self.base),
                             models=[ModelArtifact(n, p) for n, p in models.items()])
        p = impl.Params.model_validate(dict(params))
        with single_thread(), _chunk_elements(chunk), _refuse_whole_loaders(guard):
            artifact = impl.run(context, inputs, p)
        return artifact, context

    def state(self, params: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        artifact, _ = self.merge(params, **kw)
        return model_state(artifact.path)

    def skip(self, prop: str, why: str) -> None:
        self.c.report.skipped[prop] = why
        self.c.note(f"{prop}: not checked: {why}")

    # -- properties ----------------------------------------------------------------------

    def run(self) -> None:
        c = self.c
        base_state = model_state(self.base)
        with c.prop("writes a loadable model"):
            artifact, context = self.merge(self.params)
            assert isinstance(artifact, ModelArtifact), f"run returned {type(artifact).__name__}, not ModelArtifact"
            assert Path(artifact.path).resolve() == context.output_dir.resolve(), \
                f"the artifact's path {artifact.path} is not context.output_dir {context.output_dir}"
            loads_as_model(artifact.path)
            out = model_state(artifact.path)
        c.note(f"merged {len(self.names)} models ({', '.join(self.names)}) onto a base")
        with c.prop("keeps names, shapes and dtypes"):
            _same_layout(base_state, out)
        with c.prop("a model merged with itself is itself"):
            import torch

            same = self.models[self.names[0]]
            got = self.state(self.params, base=same, models={m: same for m in self.names})
            want = model_state(same)
            _same_layout(want, got)
            for k, v in want.items():
                if v.is_floating_point():
                    torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6,
                                               msg=lambda m, k=k: f"tensor {k!r}: {m}")
        with c.prop("deterministic"):
            again = self.state(self.params)
            diff = changed_tensors(out, again)
            assert not diff, f"two runs with the same inputs and params differ in {_names(diff)}"
        inputs = 1 + len(self.names)
        with c.prop("streams"):
            with _count_reads() as reads:
                artifact, context = self.merge(self.params, chunk=SMALL_CHUNK, guard=True)
            largest = max(v.numel() * v.element_size() for v in base_state.values())
            ahead = c.impl.Params.model_validate(self.params).__dict__.get("prefetch", 0)
            ahead = 0 if ahead in (0, "0") else _size(ahead)
            bound = READ_BOUND * inputs * largest + ahead
            assert reads.peak <= bound, (
                f"held {reads.peak} bytes of input tensors at once, more than {READ_BOUND} x the "
                f"largest tensor ({largest} bytes) of each of the {inputs} inputs"
                + (f" plus the prefetch budget ({ahead})" if ahead else "")
                + ": a streaming merge holds a few tensors, never a model")
            notes = context.stats.notes.get("merge")
            assert isinstance(notes, dict) and notes.get("tensors") == len(base_state), (
                f"no streaming-merge summary for the {len(base_state)} tensors in the stage notes "
                f"(got {notes!r}): merge through engine.merging's run_merge")
            sliced = notes.get("merged_in_slices") or []
            whole = context.stats.notes.get("slow_paths", {}).get("merge: whole tensors")
            c.note(f"with slices of {SMALL_CHUNK} elements: "
                   + (f"{len(sliced)}+ tensors merged in row slices" if sliced else
                      f"large tensors merged whole ({whole or 'no reason recorded'})"))
            sliced_state = model_state(artifact.path)
        with c.prop("sliced equals whole"):
            assert sliced or whole, (
                f"with slices of {SMALL_CHUNK} elements the engine recorded neither sliced nor "
                "whole large tensors: the suite could not lower the slice size "
                "(engine.merging.execute.CHUNK_ELEMENTS), so this check would prove nothing")
            diff = changed_tensors(out, sliced_state)
            assert not diff, (f"merged in row slices of {SMALL_CHUNK} elements, tensors "
                              f"{_names(diff)} differ from the whole-tensor merge")
        self.counts()
        self.honours(out, base_state)
        self.overrides(out)
        check_searchable(self)

    def counts(self) -> None:
        """Fewer models than ``min_models`` or more than ``max_models``: an error."""
        low, high = model_count(self.c.impl)
        wrong = ([low - 1] if low > 1 else []) + ([high + 1] if high is not None else [])
        if not wrong:
            self.skip(COUNTS, f"it merges any number of models (min_models={low}, max_models=None)")
            return
        names, k = self.names, len(self.names)
        with self.c.prop(COUNTS):
            for n in wrong:
                # the merged models first (so params naming them still resolve), then again
                models = {(names[i] if i < k else f"{names[i % k]}-{i}"): self.models[names[i % k]]
                          for i in range(n)}
                try:
                    self.merge(self.params, models=models)
                except Exception:  # noqa: BLE001 - any error refuses; a merge is what fails
                    continue
                raise AssertionError(
                    f"merged {n} models although it declares min_models={low}, max_models={high}: "
                    "refuse other counts with an error (MergeMethod does) or declare the range "
                    "it merges")

    def affected(self) -> set[str]:
        """Floating tensors whose inputs are not all identical (the base counts for a
        method that merges task vectors)."""
        import torch

        folders = [*([self.base] if getattr(self.c.impl, "task_vectors", True) else []),
                   *self.models.values()]
        states = [model_state(f) for f in folders]
        return {k for k, v in states[0].items()
                if v.is_floating_point() and not all(torch.equal(v, s[k]) for s in states[1:])}

    def honours(self, out: dict[str, Any], base_state: dict[str, Any]) -> None:
        c = self.c
        P = c.impl.Params
        fields = {f.alias or n: f for n, f in P.model_fields.items()}
        affected = self.affected()
        problems: list[str] = []
        with c.prop("honours every parameter"):
            for key, info in fields.items():
                if key == "overrides":
                    continue
                if key in NOT_VARIED and key not in self.variations:
                    c.note(f"{key} not varied ({NOT_VARIED[key]})")
                    continue
                current = self.params.get(key, info.get_default(call_default_factory=True))
                value = self._variation(key, info, current)
                if value is _MISSING:
                    problems.append(f"{key}: no variation given; pass variations={{{key!r}: <value>}} "
                                    "with a value that should change the output")
                    continue
                try:
                    got_art, _ = self.merge({**self.params, key: value})
                except Exception as exc:
                    problems.append(f"{key}={value!r}: the merge raised {type(exc).__name__}: {exc}")
                    continue
                got = model_state(got_art.path)
                self.varied[key] = (value, got)
                problem = self._judge(key, info, value, out, got, got_art.path, affected)
                if problem:
                    problems.append(problem)
            assert not problems, "; ".join(problems)

    def _variation(self, key: str, info: Any, current: Any) -> Any:
        if key in self.variations:
            return self.variations[key]
        first, others = self.names[0], self.names[1:]
        if key == "weight":
            # the first model takes a strict majority of the weight: that changes a weighted
            # sum or average and a weighted median or vote alike
            w = dict(current) if isinstance(current, dict) else {m: float(current) for m in self.names}
            majority = 2 * sum(abs(w.get(m, 1.0)) for m in others) + 1
            w[first] = majority if w.get(first, 1.0) != majority else 0.25
            return w
        if key == "lambda":
            return float(current) * 0.5 if current else 0.5
        if key == "density":
            if isinstance(current, dict):
                return {**current, first: 0.5 if current.get(first, 1.0) != 0.5 else 0.25}
            return 0.5 if current != 0.5 else 0.25
        if key == "out_dtype":
            return "float16" if current == "bfloat16" else "bfloat16"
        if key == "shard_size":
            return "16KB"
        if key == "prefetch":
            return "1MB"
        if isinstance(current, bool):
            return not current
        options = typing.get_args(info.annotation)
        if typing.get_origin(info.annotation) is typing.Literal:
            others_ = [o for o in options if o != current]
            if others_:
                return others_[0]
        return _MISSING

    def _judge(self, key: str, info: Any, value: Any, out: dict[str, Any], got: dict[str, Any],
               folder: Path, affected: set[str]) -> str | None:
        if key == "prefetch" or _not_in_result(info):
            diff = changed_tensors(out, got)
            return (f"{key}={value!r} is marked as not changing the result but changed "
                    f"{_names(diff)}") if diff else None
        if key == "out_dtype":
            wrong = [k for k, v in got.items() if v.is_floating_point() and str(v.dtype) != f"torch.{value}"]
            return f"out_dtype={value!r} left {_names(wrong)} in another dtype" if wrong else None
        if key == "shard_size":
            shards = [f for f in folder.iterdir() if f.suffix == ".safetensors"]
            return (f"shard_size={value!r} wrote {len(shards)} shard(s) for a model of "
                    f"{sum(v.numel() * v.element_size() for v in got.values())} bytes") \
                if len(shards) < 2 else None
        diff = set(changed_tensors(out, got))
        if key in SHARED:
            missed = sorted(affected - diff)
            if missed:
                return (f"{key}={value!r} changed {len(diff & affected)} of the {len(affected)} "
                        f"tensors whose inputs differ; unchanged: {_names(missed)}")
            return None
        return None if diff else f"{key}={value!r} changed no tensor"

    def overrides(self, out: dict[str, Any]) -> None:
        import re

        c = self.c
        declared = {f.alias or n: f for n, f in c.impl.Params.model_fields.items()}
        if "overrides" not in declared:
            self.skip(OVERRIDES, "Params declares no 'overrides' field: a recipe that sets "
                                 "overrides is refused by the schema")
            return
        settable = [k for k, info in declared.items()
                    if k not in EXECUTION_FIELDS and not _not_in_result(info)]
        if not settable:
            self.skip(OVERRIDES, "nothing to override: every param of Params is an execution "
                                 f"param ({', '.join(sorted(EXECUTION_FIELDS))}), which an "
                                 "override cannot set")
            return
        pattern = re.compile(OVERRIDE_MATCH)
        shared = [k for k in SHARED if k in self.varied]
        own = [k for k in settable if k not in SHARED and k in self.varied
               and any(pattern.search(n) for n in changed_tensors(out, self.varied[k][1]))]
        if not shared + own:
            self.skip(OVERRIDES, f"no variation of {settable} changes a tensor matching "
                                 f"{OVERRIDE_MATCH!r}, so an override of it would show nothing")
            return
        key = (shared + own)[0]
        value, everywhere = self.varied[key]
        ov = [{"match": OVERRIDE_MATCH, key: value}]
        try:
            got = self.state({**self.params, "overrides": ov})
        except Exception as exc:
            if "override" not in str(exc).lower():
                c.fail(OVERRIDES, f"an override {ov[0]!r} made the merge raise "
                                  f"{type(exc).__name__}: {exc} (a method that cannot apply "
                                  "overrides must refuse them with an error that names 'overrides')")
            with c.prop(OVERRIDES_REFUSED):
                pass
            self.skip(OVERRIDES, f"the method refuses overrides: {type(exc).__name__}: {exc}")
            return
        with c.prop(OVERRIDES):
            diff = set(changed_tensors(out, got))
            outside = sorted(k for k in diff if not pattern.search(k))
            assert not outside, (f"an override {ov[0]!r} changed tensors it does not match: "
                                 f"{_names(outside)}")
            targets = {k for k in changed_tensors(out, everywhere) if pattern.search(k)}
            missed = sorted(targets - diff)
            assert not missed, (f"an override {ov[0]!r} left {len(missed)} of the {len(targets)} "
                                f"matching tensors unchanged: {_names(missed)}")
            other = sorted(k for k in got if pattern.search(k) and k in everywhere
                           and changed_tensors({k: everywhere[k]}, {k: got[k]}))
            assert not other, (f"an override {ov[0]!r} gave matching tensors {_names(other)} other "
                               f"values than {key}={value!r} set for every tensor gives them")
            c.note(f"overrides checked with {key}={value!r} for tensors matching {OVERRIDE_MATCH!r}")


def _not_in_result(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("affects_output") is False
