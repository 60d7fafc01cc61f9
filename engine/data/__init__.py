"""Data a stage reads, streamed: files, folders of shards, local hub datasets, and the
token cache.

* :mod:`engine.data.records` -- a data spec's ``records`` ranges;
* :mod:`engine.data.files` -- single files (``.txt``, ``.jsonl``, ``.parquet``): checks,
  format detection and record readers;
* :mod:`engine.data.shards` -- folders of shards and datasets in the local hub cache;
* :mod:`engine.data.sources` -- a recipe's data spec resolved to a checked source, and a
  text source's documents whatever holds them;
* :mod:`engine.data.token_cache` -- memory-mapped token ids, tokenized once per
  (tokenizer, content).
"""

from engine.data.files import (
    check_file,
    count_records,
    detect_format,
    iter_answers,
    iter_choices,
    iter_instructions,
    iter_jsonl,
    iter_lines,
    iter_records,
    source_bounds,
)
from engine.data.records import parse_record_range, record_bounds
from engine.data.sources import iter_texts, resolve_data

__all__ = ["check_file", "count_records", "detect_format", "iter_answers", "iter_choices",
           "iter_instructions", "iter_jsonl", "iter_lines", "iter_records", "iter_texts",
           "parse_record_range", "record_bounds", "resolve_data", "source_bounds"]
