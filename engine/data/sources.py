"""Data sources: a recipe's data spec resolved to a checked :class:`~engine.core.inputs.DataSource`,
and the documents of a text source, whatever holds them.

A data spec names a file, a folder of shards (:mod:`engine.data.shards`), a dataset in the
local Hugging Face cache, or a built-in file of the tiny world (:mod:`engine.world`);
:func:`resolve_data` turns each into one ``DataSource`` and checks what can be checked
before a stage runs (:func:`engine.data.files.check_file`). :func:`iter_texts` streams the
documents of a text source from a single file (:mod:`engine.data.files`), a parquet file
or a folder of shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import world
from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.files import check_file, detect_format, file_texts, source_bounds
from engine.data.shards import resolve_folder, resolve_hub_dataset, text_batches

__all__ = ["iter_texts", "resolve_data"]


def resolve_data(spec: Any, recipe_dir: Path) -> DataSource:
    """A recipe :class:`~engine.recipe.DataSpec` as a checked :class:`DataSource`."""
    if getattr(spec, "hf_dataset", None) is not None:
        return resolve_hub_dataset(spec)
    if spec.builtin is not None:
        path = world.data_path(spec.builtin)
    else:
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = (Path(recipe_dir) / path).resolve()
        if path.is_dir():
            return resolve_folder(spec, path)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
    check_file(path, spec.text_field)
    records = getattr(spec, "records", None)
    source_bounds(path, records)  # a range beyond the file's end is named now
    fmt = spec.format
    if fmt == "auto":
        fmt = detect_format(path, spec.text_field)
    if path.suffix == ".parquet" and fmt != "text":
        raise DataError(f"{path}: parquet files hold text (format 'text'), not {fmt!r}")
    return DataSource(path=path, format=fmt, language=spec.language, weight=spec.weight,
                      text_field=spec.text_field, records=records)


def iter_texts(source: DataSource) -> Iterator[str]:
    """The documents of a text source (a file or a folder of shards), streamed."""
    if source.shards or source.path.suffix == ".parquet":
        for batch in text_batches(source):
            yield from batch
        return
    yield from file_texts(source)
