"""The recipe's data entries: a file, a built-in world file or a local hub dataset a stage
reads (a stage's ``data:`` and a search's dev data, :mod:`engine.recipe.search`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.data.records import parse_record_range
from engine.recipe.runtime import _Strict

__all__ = ["DataSpec"]


class DataSpec(_Strict):
    """A data file a stage reads; a list of them is mixed by ``weight``."""

    path: str | None = Field(None, description="A .txt, .jsonl or .parquet file, or a folder of such "
                             "shards read in sorted name order (relative to the recipe file).")
    builtin: str | None = Field(None, description="Built-in world file, e.g. 'lum/train.txt'.")
    hf_dataset: str | None = Field(None, description="A dataset already in the local Hugging Face hub "
                                   "cache, e.g. 'org/mn-news' (never downloaded while a recipe runs); its "
                                   "'split' files are read as a folder of shards.")
    hf_config: str | None = Field(None, description="With hf_dataset: the config (subfolder) to read.")
    split: str = Field("train", description="With hf_dataset: the split to read.")
    format: Literal["auto", "text", "instructions", "choice", "generation"] = Field(
        "auto", description="What the file holds; 'auto' looks at the extension and first record.")
    language: str | None = Field(None, description="Language label used in metrics and mixing.")
    weight: float = Field(1.0, gt=0, description="Mixing weight relative to the other files.")
    text_field: str = Field("text", description="Field (jsonl) or column (parquet) holding the text.")
    glob: str | None = Field(None, description="For a folder 'path': which shard files to read, a glob "
                             "on names inside it (e.g. 'train-*.parquet', '**/*.txt'); default: every "
                             ".txt, .jsonl or .parquet file directly in the folder.")
    skip_broken_shards: bool = Field(False, description="For a folder 'path': skip a shard that cannot be "
                                     "read (named in a warning and in the stage's notes) instead of failing.")
    records: str | None = Field(
        None, description="Read only this range of the file's records (non-empty lines, in file "
        "order), as 'start:end' with record indices or percentages of the file: '0:50%' the first "
        "half, '50%:' the rest, '96:192'. For parquet a record is a row. Not for folders (select shards "
        "with 'glob'). Part of the stage's cache key; unset reads every record.")

    @field_validator("records", mode="before")
    @classmethod
    def _record_range(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 0:50 as the base-60 number 50
            raise ValueError(f"got the number {v!r}; write the range as a quoted string, e.g. "
                             "'0:50' or '0:50%' (unquoted, YAML reads 0:50 as a base-60 number)")
        if v is not None:
            parse_record_range(v)  # ValueError -> pydantic names the field 'records'
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if sum(x is not None for x in (self.path, self.builtin, self.hf_dataset)) != 1:
            raise ValueError("give exactly one of 'path', 'builtin' or 'hf_dataset'")
        return self
