"""Conformance of merge methods, continued: a merge search can search the method
(called from :mod:`engine.testing._merge`)."""

from __future__ import annotations

from typing import Any

from engine.core.artifacts import ModelArtifact
from engine.core.errors import RecipeError
from engine.core.inputs import StageInputs
from engine.core.stages import MERGE
from engine.merging.search.candidate import InMemoryMerge
from engine.merging.search.space import build_space
from engine.testing._checks import changed_tensors, quiet_context, single_thread
from engine.testing._instrument import _names

__all__ = ["SEARCHABLE", "check_searchable"]

#: the property a report lists (or skips, for a method that declares nothing to search)
SEARCHABLE = "searchable: its space builds and an in-memory candidate is the merge it writes"


def _point(dim: Any) -> Any:
    """A value inside a dimension away from its ends (a third of the way), or the last choice."""
    if dim.choices is not None:
        return dim.choices[-1]
    value = dim.low + (dim.high - dim.low) / 3
    return round(value) if dim.integer else value


def check_searchable(checks: Any) -> None:
    """``search:`` can sample every declared param that has a usable range (the others are
    noted: a recipe must give their range), and the candidate a trial merges in memory
    equals, tensor for tensor, the model the stage streams with the same params."""
    import optuna  # imported here for start-up speed: the conformance suite loads without optuna

    c = checks.c
    impl = c.impl
    if not callable(getattr(impl, "tensor_merge", None)):
        checks.skip(SEARCHABLE, "not a MergeMethod (engine.api.merging): a search needs the "
                                "params a MergeMethod declares")
        return
    fixed = {k: v for k, v in checks.params.items() if k != "overrides"}
    try:
        space = build_space({c.name: impl.Params}, c.name, checks.names, None, 1, {}, fixed)
    except RecipeError as exc:
        if "nothing to search" in str(exc):
            checks.skip(SEARCHABLE, f"it declares no param a search could sample ({exc})")
            return
        raise
    with c.prop(SEARCHABLE):
        dims = space.dimensions()
        drawn = {d.name: _point(d) for d in dims}
        _, values = space.suggest(optuna.trial.FixedTrial(drawn))
        params = {**checks.params, **values}
        streamed = checks.state(params)
        context = quiet_context(checks.workdir, "search-candidate", MERGE, c.name)
        inputs = StageInputs(base=ModelArtifact("base", checks.base),
                             models=[ModelArtifact(n, p) for n, p in checks.models.items()])
        with single_thread():
            merger = InMemoryMerge(context, inputs)
            merger.apply(impl, impl.Params.model_validate(params))
        live = {n: p.detach() for n, p in merger.model.named_parameters()}
        shared = {k: v for k, v in streamed.items() if k in live}
        assert shared, "no tensor of the streamed merge is a parameter of the loaded model"
        diff = changed_tensors(shared, {k: live[k].to(shared[k].dtype) for k in shared})
        assert not diff, (f"with {values} the in-memory candidate differs from the streamed merge "
                          f"in {_names(diff)}: a search would score another model than it writes")
        c.note(f"searchable over {len(dims)} dimension(s): {', '.join(d.name for d in dims)}")
