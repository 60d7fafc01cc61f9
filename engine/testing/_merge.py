"""Conformance of merge methods (called through :mod:`engine.testing.conformance`)."""

from __future__ import annotations

import tempfile
import typing
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from engine.artifacts import ModelArtifact
from engine.inputs import StageInputs
from engine.stages import MERGE
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
from engine.testing.builders import shared_family
from engine.testing.conformance import (
    Checker,
    ConformanceReport,
    _check_params,
    changed_tensors,
    loads_as_model,
    model_state,
    quiet_context,
    single_thread,
)

#: the merged models (of the family) and the tensors the override check targets
MODELS = ("a", "b", "c")
OVERRIDE_MATCH = r"\.mlp\."
#: merge params the suite does not vary: where the arithmetic runs, not what it computes
NOT_VARIED = {"compute_dtype": "changes rounding only", "device": "where the arithmetic runs"}

def check_merge_method(impl: Any, *, params: Mapping[str, Any] | None = None,
                       variations: Mapping[str, Any] | None = None,
                       family: Mapping[str, Path] | None = None,
                       workdir: Path | None = None) -> ConformanceReport:
    """Check a merge method on a tiny family (``base`` and models ``a``, ``b``, ``c``).

    ``params`` are the baseline params (default: the defaults); ``variations`` gives, per
    parameter of the method's own, a value to change it to (shared params get values the
    suite chooses; a variation given here wins). Properties, in order:

    * the params contract (:func:`engine.testing.conformance.check_params`);
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
    * **honours every parameter**: each advertised parameter, changed, changes the output:
      ``weight`` (the first model given a majority of the weight), ``lambda``,
      ``normalize``, ``density`` change every tensor whose inputs differ; the method's own params (``variations``; booleans are flipped, literals
      switched) change at least one; ``out_dtype`` sets the written dtype; ``shard_size``
      splits the output; ``prefetch`` and other NOT_IN_RESULT params change nothing;
    * **overrides change only matching tensors**: an override of ``weight`` for
      ``\\.mlp\\.`` tensors changes every one of them whose inputs differ and no other.
    """
    c = Checker(impl, MERGE)
    base_params = dict(params or {})
    _check_params(c, base_params)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-merge-")))
        fam = dict(family) if family is not None else shared_family()
        _MergeChecks(c, fam, Path(workdir), base_params, dict(variations or {})).run()
    return c.report


class _MergeChecks:
    def __init__(self, c: Checker, fam: dict[str, Path], workdir: Path, params: dict[str, Any],
                 variations: dict[str, Any]) -> None:
        self.c, self.fam, self.workdir = c, fam, workdir
        self.params, self.variations = params, variations
        self.runs = 0

    # -- running ---------------------------------------------------------------------------

    def merge(self, params: Mapping[str, Any], *, base: Path | None = None,
              models: Mapping[str, Path] | None = None, chunk: int | None = None,
              guard: bool = False) -> tuple[ModelArtifact, Any]:
        impl = self.c.impl
        self.runs += 1
        context = quiet_context(self.workdir, f"merge-{self.runs}", MERGE, self.c.name)
        models = models if models is not None else {m: self.fam[m] for m in MODELS}
        inputs = StageInputs(base=ModelArtifact("base", base or self.fam["base"]),
                             models=[ModelArtifact(n, p) for n, p in models.items()])
        p = impl.Params.model_validate(dict(params))
        with single_thread(), _chunk_elements(chunk), _refuse_whole_loaders(guard):
            artifact = impl.run(context, inputs, p)
        return artifact, context

    def state(self, params: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        artifact, _ = self.merge(params, **kw)
        return model_state(artifact.path)

    # -- properties ----------------------------------------------------------------------

    def run(self) -> None:
        c = self.c
        base_state = model_state(self.fam["base"])
        with c.prop("writes a loadable model"):
            artifact, context = self.merge(self.params)
            assert isinstance(artifact, ModelArtifact), f"run returned {type(artifact).__name__}, not ModelArtifact"
            assert Path(artifact.path).resolve() == context.output_dir.resolve(), \
                f"the artifact's path {artifact.path} is not context.output_dir {context.output_dir}"
            loads_as_model(artifact.path)
            out = model_state(artifact.path)
        with c.prop("keeps names, shapes and dtypes"):
            _same_layout(base_state, out)
        with c.prop("a model merged with itself is itself"):
            import torch

            same = self.fam["a"]
            got = self.state(self.params, base=same, models={m: same for m in MODELS})
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
        with c.prop("streams"):
            with _count_reads() as reads:
                artifact, context = self.merge(self.params, chunk=SMALL_CHUNK, guard=True)
            largest = max(v.numel() * v.element_size() for v in base_state.values())
            ahead = c.impl.Params.model_validate(self.params).__dict__.get("prefetch", 0)
            ahead = 0 if ahead in (0, "0") else _size(ahead)
            bound = READ_BOUND * (1 + len(MODELS)) * largest + ahead
            assert reads.peak <= bound, (
                f"held {reads.peak} bytes of input tensors at once, more than {READ_BOUND} x the "
                f"largest tensor ({largest} bytes) of each of the {1 + len(MODELS)} inputs"
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
        self.honours(out, base_state)
        self.overrides(out)

    def affected(self) -> set[str]:
        """Floating tensors whose inputs are not all identical."""
        import torch

        states = [model_state(self.fam[n]) for n in ("base", *MODELS)]
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
                problem = self._judge(key, info, value, out, got, got_art.path, affected)
                if problem:
                    problems.append(problem)
            assert not problems, "; ".join(problems)

    def _variation(self, key: str, info: Any, current: Any) -> Any:
        if key in self.variations:
            return self.variations[key]
        first = MODELS[0]
        if key == "weight":
            # the first model takes a strict majority of the weight: that changes a weighted
            # sum or average and a weighted median or vote alike
            w = dict(current) if isinstance(current, dict) else {m: float(current) for m in MODELS}
            majority = 2 * sum(abs(w.get(m, 1.0)) for m in MODELS[1:]) + 1
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
            others = [o for o in options if o != current]
            if others:
                return others[0]
        return _MISSING

    def _judge(self, key: str, info: Any, value: Any, out: dict[str, Any], got: dict[str, Any],
               folder: Path, affected: set[str]) -> str | None:
        extra = info.json_schema_extra
        if key == "prefetch" or (isinstance(extra, dict) and extra.get("affects_output") is False):
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
        if key in ("weight", "lambda", "normalize", "density"):
            missed = sorted(affected - diff)
            if missed:
                return (f"{key}={value!r} changed {len(diff & affected)} of the {len(affected)} "
                        f"tensors whose inputs differ; unchanged: {_names(missed)}")
            return None
        return None if diff else f"{key}={value!r} changed no tensor"

    def overrides(self, out: dict[str, Any]) -> None:
        import re

        c = self.c
        fields = {f.alias or n for n, f in c.impl.Params.model_fields.items()}
        if "overrides" not in fields:
            c.note("no 'overrides' param: per-tensor overrides not checked")
            return
        declared = {f.alias or n: f for n, f in c.impl.Params.model_fields.items()}
        key = next((k for k in ("weight", "lambda", "density", "normalize") if k in declared), None)
        if key is None:
            c.note("no weight, lambda, density or normalize param: overrides not checked")
            return
        with c.prop("overrides change only matching tensors"):
            info = declared[key]
            current = self.params.get(key, info.get_default(call_default_factory=True))
            ov = [{"match": OVERRIDE_MATCH, key: self._variation(key, info, current)}]
            got = self.state({**self.params, "overrides": ov})
            diff = set(changed_tensors(out, got))
            pattern = re.compile(OVERRIDE_MATCH)
            outside = sorted(k for k in diff if not pattern.search(k))
            assert not outside, (f"an override {ov[0]!r} changed tensors it does not match: "
                                 f"{_names(outside)}")
            targets = {k for k in self.affected() if pattern.search(k)}
            missed = sorted(targets - diff)
            assert not missed, (f"an override {ov[0]!r} left {len(missed)} of the {len(targets)} "
                                f"matching tensors unchanged: {_names(missed)}")
