"""``random``: new rows drawn at random, a baseline that knows nothing of the tokens.

Each row is drawn from a normal distribution with the old rows' per-dimension mean and
standard deviation (input and head each from their own), seeded by the command's seed.
"""

from __future__ import annotations

import torch

from engine.api import PluginParams, hookimpl
from engine.api.models import InitProblem, InitRows, random_rows


class RandomInit:
    """Rows drawn from a normal with the old rows' per-dimension mean and deviation."""

    name = "random"
    Params = PluginParams

    def init_rows(self, problem: InitProblem, params: PluginParams) -> InitRows:
        gen = torch.Generator().manual_seed(problem.seed)
        n = len(problem.new_tokens)
        inp = random_rows(problem.old_input, n, gen)
        out = None if problem.old_output is None else random_rows(problem.old_output, n, gen)
        return InitRows(inp, out, {})


@hookimpl
def register_embedding_inits(register):
    register(RandomInit())
