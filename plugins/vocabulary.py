"""``vocabulary``: give a model a tokenizer for its data's language, inside a recipe.

What ``engine extend-tokenizer`` and ``engine transplant-tokenizer --vocab-size`` do, as an
adapt-language stage whose data is the target text: ``tokenizer: extend`` appends up to
``new_tokens`` BPE tokens learned on it (every old id stays), ``tokenizer: learn`` replaces
the tokenizer with a BPE of ``vocab_size`` tokens learned on it (tokens both have keep
their rows exactly, at their new ids). Every new row is made by the init method ``init``
(``mean``, ``random``, ``omp``, ``focus`` or a plugin's), which sees the same text. It
trains nothing: a following ``ct`` stage with ``train_only: new-rows`` trains the new rows
(docs/extend-tokenizer.md). Only the stage's data is read, so the cache key is complete.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.api import ModelArtifact, PluginParams, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError
from engine.api.evaluation import read_documents
from engine.api.models import extend_tokenizer, transplant_tokenizer


class Vocabulary:
    """A tokenizer for the data's language (extended or learned); new rows by an init method."""

    name = "vocabulary"
    data_formats = ("text",)

    class Params(PluginParams):
        tokenizer: Literal["extend", "learn"] = Field(
            "extend", description="`extend`: append up to `new_tokens` tokens learned on the data, every "
            "old id kept; `learn`: a new BPE of `vocab_size` tokens learned on the data (shared tokens keep "
            "their rows).")
        new_tokens: int = Field(1000, ge=1, le=1_000_000, description="With `extend`: most tokens added.")
        vocab_size: int | None = Field(None, ge=1, le=1_000_000,
                                       description="With `learn`: the new vocabulary's size.")
        min_frequency: int = Field(2, ge=0, description="A learned token occurs at least this often.")
        init: str = Field("mean", description="Init method of the new rows: mean, random, omp, focus, or a "
                          "plugin's (docs/extend-tokenizer.md).")
        init_params: dict[str, Any] = Field({}, description="The init method's options, e.g. {k: 8}.")
        seed: int = Field(0, description="Seed of the init method.")

        @model_validator(mode="after")
        def _sizes(self) -> Vocabulary.Params:
            if self.tokenizer == "learn" and self.vocab_size is None:
                raise ValueError("tokenizer: learn needs vocab_size")
            if self.tokenizer == "extend" and self.vocab_size is not None:
                raise ValueError("vocab_size is for tokenizer: learn; extend adds new_tokens")
            return self

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: vocabulary needs a 'model' input")
        texts = [t for docs in read_documents(list(inputs.data), None, context.stage_name).values()
                 for t in docs]
        source = inputs.model.path.resolve()
        where = f"stage {context.stage_name!r} params.init_params"
        if params.tokenizer == "extend":
            done = extend_tokenizer(source, texts, context.output_dir, new_tokens=params.new_tokens,
                                    min_frequency=params.min_frequency, init=params.init,
                                    init_params=params.init_params, seed=params.seed, into=True,
                                    params_where=where)
            added, old, new = len(done.added), done.old_size, done.new_size
        else:
            done = transplant_tokenizer(source, context.output_dir, vocab_size=params.vocab_size, texts=texts,
                                        init=params.init, init_params=params.init_params, seed=params.seed,
                                        min_frequency=params.min_frequency, into=True, params_where=where)
            added, old, new = len(done.added), done.old_size, done.new_size
        # nothing trains here: the parameters the stage set are the rows the init method made
        made = json_rows(context.output_dir)
        context.set_param_counts(trainable=made, forward=done.params)
        from tokenizers import Tokenizer  # the text read, counted in the new tokenizer's tokens

        tok = Tokenizer.from_file(str(context.output_dir / "tokenizer.json"))
        context.add_tokens(sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)))
        context.note("vocabulary", {"tokenizer": params.tokenizer, "init": params.init, "old_size": old,
                                    "new_size": new, "rows_made": added, "init_notes": done.notes})
        context.log(f"vocabulary {old} -> {new}: {added} rows by {params.init}")
        meta = {"kind": "vocabulary", "source_model": str(source)}
        return ModelArtifact(name=context.stage_name, path=context.output_dir, meta=meta)


def json_rows(folder: Any) -> int:
    """Parameters of the rows the init method made (rows x hidden, per vocabulary tensor)."""
    meta = models.read_meta(folder)
    rows = sum(b - a for a, b in meta.get("new_rows", []))
    hidden = meta.get("hidden_size", 0)
    return rows * hidden * meta.get("vocab_tensors", 1)


@hookimpl
def register_language_adapters(register):
    register(Vocabulary())
