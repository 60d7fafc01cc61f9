"""A merge's ``tokenizer:``: inputs whose tokenizers do not extend one another, merged after
each is given one input's tokenizer.

The vocabulary rule of a merge (:mod:`engine.merging.vocab`) merges rows id for id, so
tokenizers must extend one another. ``params.tokenizer: {model: NAME, init: ...}`` asks
the engine to do first what that rule's error suggests: every input (the base included)
whose token -> id map differs from input ``NAME``'s gets ``NAME``'s tokenizer by
:func:`~engine.models.tokenizer.transplant.transplant_tokenizer` (tokens both have keep
their rows exactly, at their new ids; the others are made by ``init``, which sees
``NAME``'s own embedding as the donor space, so ``omp`` fits there without text). The
transplanted copies live in an engine temporary folder beside the stage's output for the
length of the stage (a search's worker processes read them too) and are removed after it;
the merge (or a search's candidates) then runs on them as on any inputs. The runner
applies it to every merge stage (:mod:`engine.run.runner`), so a plugin sees inputs that
already share one tokenizer. Each transplant's facts are a stage note.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.core import outputs
from engine.core.artifacts import ModelArtifact
from engine.core.errors import MergeError, ModelLoadError, RecipeError
from engine.core.inputs import StageInputs
from engine.merging.params import OntoTokenizer
from engine.merging.vocab import token_ids
from engine.models.tokenizer.transplant import transplant_tokenizer

__all__ = ["onto_one_tokenizer"]


def _spec(value: Any) -> OntoTokenizer | None:
    if value is None or isinstance(value, OntoTokenizer):
        return value
    return OntoTokenizer.model_validate(value)


@contextmanager
def onto_one_tokenizer(context: Any, inputs: StageInputs, tokenizer: Any) -> Iterator[StageInputs]:
    """``inputs`` with every model whose tokenizer differs from ``tokenizer.model``'s
    replaced by a transplanted copy (``inputs`` itself when ``tokenizer`` is None)."""
    spec = _spec(tokenizer)
    if spec is None:
        yield inputs
        return
    every = [*([inputs.base] if inputs.base is not None else []), *inputs.models]
    where = f"stage {context.stage_name!r} params.tokenizer"
    target = next((m for m in every if m.name == spec.model), None)
    if target is None:
        raise RecipeError(f"{where}.model: {spec.model!r} is not an input of the merge "
                          f"(inputs: {', '.join(m.name for m in every)})")
    wanted = token_ids(Path(target.path))
    if wanted is None:
        raise MergeError(f"{where}.model: model {spec.model!r} ({target.path}) has no tokenizer.json")
    folder = outputs.temp_dir(f".{context.stage_name}.tmp-tokenizer-", Path(context.output_dir).parent)
    try:
        moved: dict[str, ModelArtifact] = {}
        for art in every:
            if art.name in moved or dict(token_ids(Path(art.path)) or {}) == dict(wanted):
                continue
            context.log(f"giving {art.name} the tokenizer of {spec.model} (init {spec.init})")
            try:
                done = transplant_tokenizer(Path(art.path), folder / art.name, tokenizer=Path(target.path),
                                            init=spec.init, init_params=spec.init_params, seed=spec.seed,
                                            flag=f"{where} (for {art.name})",
                                            params_where=f"{where}.init_params")
            except ModelLoadError as exc:
                raise MergeError(f"{where}: giving {art.name!r} the tokenizer of {spec.model!r} "
                                 f"failed: {exc}") from None
            context.note(f"tokenizer:{art.name}", {
                "onto": spec.model, "init": spec.init, "shared_tokens": done.shared,
                "rows_made": len(done.added), "init_notes": done.notes})
            moved[art.name] = replace(art, path=folder / art.name)
        yield StageInputs(model=inputs.model,
                          models=[moved.get(m.name, m) for m in inputs.models],
                          base=moved.get(inputs.base.name, inputs.base) if inputs.base is not None else None,
                          layers=inputs.layers, data=list(inputs.data))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
