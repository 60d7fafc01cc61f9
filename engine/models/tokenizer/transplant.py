"""Give a model another tokenizer: a donor model's, or one the engine learns on target text.

:func:`transplant_tokenizer` writes a new model folder in which every token of the new
vocabulary has a row: a token the old vocabulary also has (the same text, or the same
special token) keeps its old row exactly, whatever its id; every other row is made by an
init method (:mod:`engine.models.tokenizer.inits`: ``mean``, ``random``, ``omp``,
``focus`` or a plugin's). ``engine transplant-tokenizer`` is this function; the
``vocabulary`` stage runs it inside a recipe. :func:`change_vocabulary` is the part it
shares with ``engine extend-tokenizer`` (:mod:`engine.models.tokenizer.extend`): map the
ids, fill the rows, write the folder beside its final place and publish it (the output
rules of :mod:`engine.core.outputs`).

The folder's lingoforge.json records the init method, its params, how many rows were
shared and made, and ``new_rows`` (id ranges of the rows the method made), which
``ct``'s ``train_only: new-rows`` trains.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.core import outputs
from engine.core.artifacts import write_meta
from engine.core.errors import ModelLoadError
from engine.models.tokenizer.inits import InitProblem, initialise
from engine.models.tokenizer.rewrite import VocabTensors, read_vocab_tensors, write_model
from engine.models.tokenizer.vocabmap import (
    Vocabulary,
    VocabularyMap,
    key_of,
    trained_tokenizer_json,
    vocabulary_map,
)

__all__ = ["Changed", "change_vocabulary", "init_problem", "new_row_ranges", "transplant_tokenizer"]


@dataclass(frozen=True)
class Changed:
    """What a vocabulary change wrote."""

    folder: Path
    old_size: int
    new_size: int
    #: the tokens whose rows the init method made, in id order
    added: list[str]
    shared: int
    init: str
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: parameters of the model written
    params: int = 0


def new_row_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Sorted ids as ``[start, end)`` ranges (what lingoforge.json's ``new_rows`` holds)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _read_spec(folder: Path, what: str) -> dict[str, Any]:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        if (Path(folder) / "tokenizer.model").is_file():
            raise ModelLoadError(f"{folder}: only a SentencePiece tokenizer.model, no tokenizer.json ({what} "
                                 "reads the fast tokenizer's file; write one with transformers: "
                                 "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
        raise ModelLoadError(f"{folder}: no tokenizer.json ({what} needs a fast BPE tokenizer)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from None


def _donor_rows(folder: Path, size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A donor folder's embedding and head when it has weights that fit its tokenizer."""
    if not (folder / "config.json").is_file():
        return None, None
    try:
        tensors = read_vocab_tensors(folder)
    except ModelLoadError:
        return None, None
    if tensors.input.shape[0] < size:
        return None, None
    return tensors.input, tensors.output


def init_problem(model_dir: Path, new_spec: dict[str, Any], *, tokenizer_from: Path,
                 texts: Iterable[str] = (), seed: int = 0, extension: bool = False,
                 donor: Path | None = None) -> tuple[InitProblem, VocabularyMap, VocabTensors]:
    """What an init method is asked when ``model_dir``'s model takes tokenizer ``new_spec``:
    the :class:`InitProblem`, the id map and the model's vocabulary tensors (read, not
    changed). :func:`change_vocabulary` fills the rows from it; the init-method conformance
    check (:func:`engine.testing.conformance.check_embedding_init`) asks a method with it."""
    model_dir = Path(model_dir)
    old = Vocabulary.from_spec(_read_spec(model_dir, "a tokenizer change"), str(model_dir / "tokenizer.json"))
    new = Vocabulary.from_spec(new_spec, str(Path(tokenizer_from) / "tokenizer.json"))
    tensors = read_vocab_tensors(model_dir)
    rows = int(tensors.input.shape[0])
    if old.size > rows:
        raise ModelLoadError(f"{model_dir}: its tokenizer has {old.size} ids but the embedding "
                             f"{tensors.input_name!r} only {rows} rows")
    vmap = vocabulary_map(old, new, rows=rows, extension=extension)
    donor_in, donor_out = _donor_rows(Path(donor), vmap.size) if donor is not None else (None, None)
    problem = InitProblem(
        old_input=tensors.input, old_output=tensors.output, new_tokens=vmap.new_tokens,
        shared=vmap.shared, old_tokenizer=old.backend, new_tokenizer=new.backend,
        texts=list(texts), seed=seed, donor_input=donor_in, donor_output=donor_out,
        surface_key=key_of, old_split=old.split, new_split=new.split,
        old_surfaces=old.surfaces, new_surfaces=new.surfaces)
    return problem, vmap, tensors


def change_vocabulary(model_dir: Path, output_dir: Path, new_spec: dict[str, Any], *,
                      tokenizer_from: Path, texts: Iterable[str] = (), init: str = "mean",
                      init_params: Mapping[str, Any] | None = None, seed: int = 0,
                      extension: bool = False, donor: Path | None = None, overwrite: bool = False,
                      kind: str = "transplanted-tokenizer", flag: str = "--output",
                      params_where: str = "--init-param", meta: Mapping[str, Any] | None = None,
                      into: bool = False, allow_disjoint: bool = False) -> Changed:
    """Write ``output_dir``: ``model_dir``'s model with tokenizer ``new_spec`` (its other
    tokenizer files from ``tokenizer_from``), shared rows copied, the others made by
    ``init``. ``extension``: ``new_spec`` extends the model's tokenizer id for id.
    ``into``: ``output_dir`` is an empty folder its caller publishes (a stage's output,
    which the runner renames into place): write straight into it. A tokenizer that shares
    no token (special tokens aside) with the model's is refused unless ``allow_disjoint``."""
    began = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir).absolute()
    outputs.check_disjoint(output_dir, [("model", model_dir), *([("tokenizer", donor)] if donor else [])],
                           flag=flag)
    held = [n for n in ("config.json", "tokenizer.json", "model.safetensors") if (output_dir / n).exists()]
    if into and held:
        raise ModelLoadError(f"{output_dir}: already holds {', '.join(held)}; a tokenizer change writes "
                             "into a folder without a model")
    if not into:
        outputs.check_target(output_dir, flag=flag, overwrite=overwrite)
    problem, vmap, tensors = init_problem(model_dir, new_spec, tokenizer_from=tokenizer_from, texts=texts,
                                          seed=seed, extension=extension, donor=donor)
    rows = int(tensors.input.shape[0])
    if not extension and not allow_disjoint and not any(
            vmap.new.surfaces.get(n) is not None for n in vmap.shared):
        raise ModelLoadError(f"{tokenizer_from / 'tokenizer.json'}: shares no token with the tokenizer of "
                             f"{model_dir}, so no row would be kept and every one made by {init!r}; "
                             "a different model family's tokenizer? Pass --allow-disjoint (allow_disjoint) "
                             "to go on anyway")
    made = initialise(init, problem, init_params, where=params_where)

    def assemble(old_rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty((vmap.size, old_rows.shape[1]), dtype=torch.float32)
        if vmap.shared:
            dst = torch.tensor(list(vmap.shared.keys()))
            src = torch.tensor(list(vmap.shared.values()))
            out[dst] = old_rows[src]
        if vmap.new_tokens:
            out[torch.tensor(vmap.new_ids)] = new_rows
        return out

    new_input = assemble(tensors.input, made.input)
    new_output = (assemble(tensors.output, made.output) if tensors.output is not None
                  and made.output is not None else None)
    old_ids = {o: n for n, o in vmap.shared.items()}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir if into else outputs.temp_dir(f".{output_dir.name}.tmp-", output_dir.parent)
    seconds = time.perf_counter() - began
    record = {"kind": kind, "source_model": str(model_dir.resolve()),
              "tokenizer_from": str(Path(tokenizer_from).resolve()),
              "init": init, "init_params": dict(init_params or {}), "seed": seed,
              "old_vocab_size": rows, "vocab_size": vmap.size, "shared_tokens": len(vmap.shared),
              "added_tokens": len(vmap.new_tokens), "new_rows": new_row_ranges(vmap.new_ids),
              "hidden_size": int(tensors.input.shape[1]), "vocab_tensors": 1 if new_output is None else 2,
              "init_notes": made.notes, **dict(meta or {})}
    try:
        params = write_model(model_dir, tmp, tensors, new_input, new_output, new_spec, Path(tokenizer_from),
                             old_ids)
        seconds = time.perf_counter() - began
        record["seconds"] = round(seconds, 3)
        write_meta(tmp, record)
        if not into:
            outputs.settle_modes(tmp)
            outputs.mark_output(tmp, kind)
    except BaseException:
        if not into:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not into:
        outputs.publish(tmp, output_dir, flag=flag, overwrite=overwrite)
    return Changed(output_dir, rows, vmap.size, [t.token for t in vmap.new_tokens], len(vmap.shared),
                   init, made.notes, seconds, params)


def transplant_tokenizer(model_dir: Path, output_dir: Path, *, tokenizer: Path | None = None,
                         vocab_size: int | None = None, texts: Iterable[str] = (), init: str = "mean",
                         init_params: Mapping[str, Any] | None = None, seed: int = 0,
                         min_frequency: int = 2, overwrite: bool = False, flag: str = "--output",
                         params_where: str = "--init-param", into: bool = False,
                         allow_disjoint: bool = False) -> Changed:
    """Write ``output_dir``: ``model_dir``'s model with another tokenizer, either the one in
    the folder ``tokenizer`` (a donor model's, or a tokenizer folder) or a BPE of
    ``vocab_size`` tokens learned on ``texts`` with the model's own pre-tokenizer and
    special tokens. Rows of tokens both vocabularies have are copied exactly; ``init`` makes
    the others (it sees ``texts`` too, and a donor's embeddings when ``tokenizer`` has weights)."""
    model_dir = Path(model_dir)
    texts = list(texts)
    if (tokenizer is None) == (vocab_size is None):
        raise ModelLoadError("transplant-tokenizer: give either a tokenizer folder (--tokenizer) "
                             "or a vocabulary size to learn on the data (--vocab-size), not both")
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_dir():
            raise ModelLoadError(f"{tokenizer}: no such tokenizer folder")
        spec = _read_spec(tokenizer, "--tokenizer")
        source = tokenizer
    else:
        if not texts:
            raise ModelLoadError("transplant-tokenizer: --vocab-size learns a tokenizer on the data, "
                                 "and the data has no text")
        spec = trained_tokenizer_json(_read_spec(model_dir, "transplant-tokenizer"), texts,
                                      int(vocab_size or 0), min_frequency)
        source = model_dir
    meta = {"learned_vocab_size": vocab_size} if vocab_size is not None else {}
    return change_vocabulary(model_dir, output_dir, spec, tokenizer_from=source, texts=texts, init=init,
                             init_params=init_params, seed=seed, donor=tokenizer, overwrite=overwrite,
                             flag=flag, params_where=params_where, meta=meta, into=into,
                             allow_disjoint=allow_disjoint)
