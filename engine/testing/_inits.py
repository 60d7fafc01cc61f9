"""The conformance check of init methods (:mod:`engine.models.tokenizer.inits`): what a
method registered through ``register_embedding_inits`` must do, asked of it on real
tokenizers and tiny models.

* **declares its parts**: a string ``name``, ``Params`` subclassing ``PluginParams`` whose
  defaults (or the given ``params``) validate, and ``init_rows(problem, params)``;
* **a row per new token**: for an untied model an input row and a head row per new token,
  ``[new tokens, hidden]``, finite floats; for a model whose head is tied to its input
  embedding, input rows and ``output`` None;
* **leaves its inputs alone**: the old embedding and head it is handed are unchanged;
* **reproducible**: the same problem and seed give the same rows, bit for bit;
* **its rows make a model that runs**: the old rows kept, the method's rows at the new
  ids, the model's forward pass over text in the new tokenizer gives finite logits.

Two problems are posed, each a tiny Llama (:mod:`engine.testing.builders`) given a BPE
learned on other text (:func:`~engine.models.tokenizer.vocabmap.trained_tokenizer_json`),
with that text as the target text: one with an untied head, one tied.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.core.params import PluginParams
from engine.models.tokenizer import inits
from engine.models.tokenizer.transplant import init_problem
from engine.models.tokenizer.vocabmap import trained_tokenizer_json
from engine.testing._checks import Checker, ConformanceReport
from engine.testing.builders import TINY_TEXT, build_tiny_llama

__all__ = ["TARGET_TEXT", "check_embedding_init"]

#: the target text of the problems posed (another script than the tiny models' own text)
TARGET_TEXT = ["кошка сидит на ковре у окна", "собака бежит в парке утром", "лум вела дора сен тари",
               "мама мыла раму, папа читал газету", "дети играют во дворе до вечера"] * 8

KIND = "embedding-init"


def _problem(folder: Path, *, tied: bool, seed: int) -> tuple[inits.InitProblem, Any, Any, Path]:
    model = folder / ("tied" if tied else "untied")
    if not (model / "config.json").is_file():
        build_tiny_llama(model, num_layers=2, tied=tied)
    spec = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    new_spec = trained_tokenizer_json(spec, TARGET_TEXT + TINY_TEXT, 400, 2)
    problem, vmap, tensors = init_problem(model, new_spec, tokenizer_from=model, texts=TARGET_TEXT, seed=seed)
    return problem, vmap, tensors, model


def check_embedding_init(method: Any, *, params: Mapping[str, Any] | None = None,
                         folder: Path | None = None) -> ConformanceReport:
    """Check an init method (the object its plugin registers) against the properties in
    this module's docstring; ``params`` are its ``Params`` values (default: its defaults),
    ``folder`` where the tiny models are built (default: a temporary folder)."""
    c = Checker(method, KIND)
    with c.prop("declares its parts"):
        why = inits._check(method)
        assert why is None, why
        parsed = method.Params(**dict(params or {}))
    with tempfile.TemporaryDirectory(prefix="lingoforge-init-check-") as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        for tied in (False, True):
            which = "tied head" if tied else "untied head"
            problem, vmap, tensors, model = _problem(root, tied=tied, seed=0)
            before = (problem.old_input.clone(),
                      None if problem.old_output is None else problem.old_output.clone())
            rows = _check_rows(c, method, problem, parsed, which)
            with c.prop("leaves its inputs alone"):
                assert torch.equal(problem.old_input, before[0]), f"{which}: the old input embedding changed"
                if before[1] is not None:
                    assert torch.equal(problem.old_output, before[1]), f"{which}: the old head changed"
            with c.prop("reproducible"):
                again = method.init_rows(_problem(root, tied=tied, seed=0)[0], parsed)
                assert torch.equal(rows.input.float(), again.input.float()), \
                    f"{which}: the same problem and seed gave other input rows"
                if rows.output is not None:
                    assert again.output is not None and torch.equal(rows.output.float(), again.output.float()), \
                        f"{which}: the same problem and seed gave other head rows"
            with c.prop("its rows make a model that runs"):
                _forward(model, vmap, tensors, rows, tied, which)
    c.report.passed = list(dict.fromkeys(c.report.passed))  # each property once, asked of both models
    c.note(f"asked for {len(problem.new_tokens)} new rows of a tied and an untied tiny model")
    return c.report


def _check_rows(c: Checker, method: Any, problem: inits.InitProblem, params: PluginParams,
                which: str) -> inits.InitRows:
    with c.prop("a row per new token"):
        rows = method.init_rows(problem, params)
        assert isinstance(rows, inits.InitRows), f"init_rows returned {type(rows).__name__}, not InitRows"
        want = (len(problem.new_tokens), problem.hidden)
        got = tuple(getattr(rows.input, "shape", ()))
        assert got == want, f"{which}: input rows of shape {got}, expected {want}"
        assert rows.input.is_floating_point() and bool(torch.isfinite(rows.input).all()), \
            f"{which}: input rows are not finite floats"
        if problem.tied:
            assert rows.output is None, f"{which}: head rows returned for a model whose head is tied"
        else:
            assert rows.output is not None, f"{which}: no head rows for a model with its own head"
            got = tuple(rows.output.shape)
            assert got == want, f"{which}: head rows of shape {got}, expected {want}"
            assert rows.output.is_floating_point() and bool(torch.isfinite(rows.output).all()), \
                f"{which}: head rows are not finite floats"
    return rows


def _forward(model_dir: Path, vmap: Any, tensors: Any, rows: inits.InitRows, tied: bool, which: str) -> None:
    """The model with the new vocabulary's rows (kept and made) runs on target text."""
    from transformers import AutoModelForCausalLM  # start-up speed: only when a check runs

    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def assemble(old: torch.Tensor, made: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((vmap.size, old.shape[1]))
        if vmap.shared:
            out[torch.tensor(list(vmap.shared))] = old[torch.tensor(list(vmap.shared.values()))].float()
        if vmap.new_tokens:
            out[torch.tensor(vmap.new_ids)] = made.float()
        return out

    model.resize_token_embeddings(vmap.size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(assemble(tensors.input, rows.input))
        if not tied:
            model.get_output_embeddings().weight.copy_(assemble(tensors.output, rows.output))
    ids = torch.tensor([vmap.new.backend.encode(TARGET_TEXT[0]).ids])
    assert int(ids.max()) < vmap.size, f"{which}: the new tokenizer spells ids beyond the new vocabulary"
    with torch.no_grad():
        logits = model(ids).logits
    assert bool(torch.isfinite(logits).all()), f"{which}: the model with the method's rows gives non-finite logits"
