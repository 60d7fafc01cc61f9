"""``omp``: each new token as a sparse combination of old tokens, by orthogonal matching pursuit.

The combination is fitted in a space where the new token and old tokens are both known,
then the same coefficients combine the old tokens' rows of the model:

* ``space: donor``: the donor model's own embedding, when the new tokenizer came from a
  model folder with weights (the donor has a row for the new token and for every token
  both vocabularies share; the head is fitted in the donor's head where both have one);
* ``space: aux``: fastText vectors learned on the target text
  (:mod:`engine.models.tokenizer.auxiliary`, as ``focus``; needs gensim);
* ``auto`` (default): ``donor`` where there is one, else ``aux``.

For each new token the ``neighbors`` most similar candidates (cosine) are taken and
matching pursuit picks at most ``k`` of them, refitting their coefficients by least
squares after each pick (mergekit's tokensurgeon fits the same way, kNN then OMP, in a
donor's embedding space).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from engine.api import hookimpl
from engine.api.errors import RecipeError
from engine.api.models import (
    AuxParams,
    InitProblem,
    InitRows,
    aux_atoms,
    aux_vector,
    omp_batch,
    piece_mean,
    random_rows,
    train_aux,
)


class OmpInit:
    """A sparse combination of old tokens by matching pursuit, in a donor's or a fastText space."""

    name = "omp"  # space: aux needs gensim; train_aux says so (space: donor does not)

    class Params(AuxParams):
        space: Literal["auto", "donor", "aux"] = Field(
            "auto", description="Where the combination is fitted: `donor` (the donor model's embedding), "
            "`aux` (fastText vectors of the target text), `auto`: donor when there is one.")
        k: int = Field(8, ge=1, le=256, description="Most old tokens in one combination.")
        neighbors: int = Field(64, ge=1, le=4096, description="Candidates (most similar old tokens) "
                               "matching pursuit chooses from.")

    def init_rows(self, problem: InitProblem, params: Params) -> InitRows:
        began = time.perf_counter()
        space = params.space
        if space == "auto":
            space = "donor" if problem.donor_input is not None else "aux"
        if space == "donor":
            if problem.donor_input is None:
                raise RecipeError("init method omp: space 'donor' needs a tokenizer folder with model "
                                  "weights (a donor model); use space: aux")
            rows_in, rows_out, notes = _donor_rows(problem, params)
        else:
            rows_in, rows_out, notes = _aux_rows(problem, params)
        notes.update(space=space, k=params.k, seconds=round(time.perf_counter() - began, 3))
        return InitRows(rows_in, rows_out, notes)


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-8)


def _candidates(unit_atoms: np.ndarray, targets: np.ndarray, neighbors: int, block: int = 1024
                ) -> np.ndarray:
    """Per target row, the indices of its ``neighbors`` most similar atoms (cosine), computed
    a block of targets at a time in float32 (one matrix product per block)."""
    atoms32 = unit_atoms.astype(np.float32)
    k = min(neighbors, atoms32.shape[0])
    out = np.empty((targets.shape[0], k), dtype=np.int64)
    for a in range(0, targets.shape[0], block):
        sims = _unit(targets[a:a + block].astype(np.float32)) @ atoms32.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[a:a + block] = np.take_along_axis(part, order, axis=1)
    return out


def _combine(rows: torch.Tensor, idx: np.ndarray, coef: np.ndarray) -> torch.Tensor:
    """Row ``t``: ``sum_j coef[t, j] * rows[idx[t, j]]`` (``idx`` -1 where a fit stopped early)."""
    gathered = rows[torch.from_numpy(np.maximum(idx, 0))]          # [t, k, hidden]
    return torch.einsum("tk,tkh->th", torch.from_numpy(coef.astype(np.float32)), gathered)


def _sizes(idx: np.ndarray) -> list[int]:
    return [int(n) for n in (idx >= 0).sum(axis=1)]


def _donor_rows(problem: InitProblem, params: OmpInit.Params
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    shared_new = list(problem.shared.keys())
    shared_old = torch.tensor([problem.shared[i] for i in shared_new])
    if not shared_new:
        raise RecipeError("init method omp: the two vocabularies share no token, so no donor row "
                          "can be written in the model's old tokens")
    assert problem.donor_input is not None
    spaces = [(problem.donor_input, problem.old_input)]
    if problem.old_output is not None:
        donor_head = problem.donor_output if problem.donor_output is not None else problem.donor_input
        spaces.append((donor_head, problem.old_output))
    results: list[torch.Tensor] = []
    sizes: list[int] = []
    new_ids = [t.id for t in problem.new_tokens]
    for donor, old in spaces:
        atoms = donor[shared_new].numpy()  # float32: a 128k x 4096 donor stays a few GiB
        targets = donor[new_ids].numpy()
        near = _candidates(_unit(atoms), targets, params.neighbors)
        idx, coef = omp_batch(atoms, near, targets, params.k)
        sizes += _sizes(idx)
        results.append(_combine(old[shared_old], idx, coef))
    notes = {"shared_atoms": len(shared_new), "mean_old_tokens_used": round(float(np.mean(sizes)), 2)}
    return results[0], results[1] if len(results) > 1 else None, notes


def _aux_rows(problem: InitProblem, params: OmpInit.Params
              ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    space = train_aux(problem, params)
    ids, atoms = aux_atoms(problem, space)
    atoms = atoms.astype(np.float64)
    old_in = problem.old_input[ids]
    old_out = None if problem.old_output is None else problem.old_output[ids]
    tokens = problem.new_tokens
    if params.fallback == "mean":
        fall_in = piece_mean(problem.old_input, tokens)
        fall_out = None if old_out is None else piece_mean(problem.old_output, tokens)
    else:
        gen = torch.Generator().manual_seed(problem.seed)
        fall_in = random_rows(problem.old_input, len(tokens), gen)
        fall_out = None if old_out is None else random_rows(problem.old_output, len(tokens), gen)
    vectors = [aux_vector(problem, space, token) for token in tokens]
    have = [n for n, v in enumerate(vectors) if v is not None]
    rows_in = fall_in.clone()
    rows_out = None if old_out is None or fall_out is None else fall_out.clone()
    sizes: list[int] = []
    if have:
        known = np.stack([vectors[n] for n in have])
        idx, coef = omp_batch(atoms, _candidates(atoms, known, params.neighbors), known, params.k)
        sizes = _sizes(idx)
        where = torch.tensor(have)
        rows_in[where] = _combine(old_in, idx, coef)
        if rows_out is not None and old_out is not None:
            rows_out[where] = _combine(old_out, idx, coef)
    rare = len(tokens) - len(have)
    notes = {"aux_tokens": len(space.index), "old_tokens_with_vectors": len(ids), "fallback_rows": rare,
             "fallback": params.fallback,
             "mean_old_tokens_used": round(float(np.mean(sizes)), 2) if sizes else 0.0}
    return rows_in, rows_out, notes


@hookimpl
def register_embedding_inits(register):
    register(OmpInit())
