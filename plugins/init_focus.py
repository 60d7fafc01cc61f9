"""``focus``: FOCUS-style rows (Dobler and de Melo, arXiv 2305.14481).

Auxiliary fastText token vectors are learned on the target text
(:mod:`engine.models.tokenizer.auxiliary`); each new token's rows are a weighted sum of
the rows of old tokens, weighted by the sparsemax of the cosine similarities between the
new token's auxiliary vector and theirs, so only the few most similar old tokens count.
A new token too rare to have an auxiliary vector takes ``fallback``. Needs the target
text and gensim (``lingoforge[vocab]``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.api import hookimpl
from engine.api.models import (
    AUX_EXTRA,
    AUX_REQUIRES,
    AuxParams,
    InitProblem,
    InitRows,
    aux_atoms,
    aux_vector,
    piece_mean,
    random_rows,
    sparsemax,
    train_aux,
)


class FocusInit:
    """Sparsemax-weighted old rows, by similarity in fastText vectors learned on the target text."""

    name = "focus"
    requires = AUX_REQUIRES
    extra = AUX_EXTRA

    class Params(AuxParams):
        pass

    def init_rows(self, problem: InitProblem, params: Params) -> InitRows:
        began = time.perf_counter()
        space = train_aux(problem, params)
        ids, atoms = aux_atoms(problem, space)
        old_in = problem.old_input[ids]
        old_out = None if problem.old_output is None else problem.old_output[ids]
        fall_in, fall_out = _fallback(problem, params.fallback)
        rows_in, rows_out, used, rare = [], [], [], 0
        for n, token in enumerate(problem.new_tokens):
            v = aux_vector(problem, space, token)
            if v is None:
                rare += 1
                rows_in.append(fall_in[n])
                if fall_out is not None:
                    rows_out.append(fall_out[n])
                continue
            w = torch.from_numpy(sparsemax(atoms @ v)).float()
            used.append(int((w > 0).sum()))
            rows_in.append(w @ old_in)
            if old_out is not None:
                rows_out.append(w @ old_out)
        notes = {"aux_tokens": len(space.index), "old_tokens_with_vectors": len(ids),
                 "fallback_rows": rare, "fallback": params.fallback,
                 "mean_old_tokens_used": round(float(np.mean(used)), 2) if used else 0.0,
                 "seconds": round(time.perf_counter() - began, 3)}
        return InitRows(torch.stack(rows_in), torch.stack(rows_out) if old_out is not None else None, notes)


def _fallback(problem: InitProblem, how: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows for tokens without an auxiliary vector, one per new token (only some are used)."""
    tokens = problem.new_tokens
    if how == "mean":
        out = None if problem.old_output is None else piece_mean(problem.old_output, tokens)
        return piece_mean(problem.old_input, tokens), out
    gen = torch.Generator().manual_seed(problem.seed)
    inp = random_rows(problem.old_input, len(tokens), gen)
    out = None if problem.old_output is None else random_rows(problem.old_output, len(tokens), gen)
    return inp, out


@hookimpl
def register_embedding_inits(register):
    register(FocusInit())
