"""``mean``: each new token's rows are the mean of the rows of the old tokens it replaces.

The old tokenizer splits the new token's text into pieces (for a byte-level token never
seen before: its bytes); the input row is the mean of those pieces' input rows, the head
row the mean of their head rows. Needs no text and no optional package.
"""

from __future__ import annotations

from engine.api import PluginParams, hookimpl
from engine.api.models import InitProblem, InitRows, piece_mean


class MeanInit:
    """The mean of the rows of the old tokens the new one replaces (its pieces)."""

    name = "mean"
    Params = PluginParams

    def init_rows(self, problem: InitProblem, params: PluginParams) -> InitRows:
        tokens = problem.new_tokens
        out = None if problem.old_output is None else piece_mean(problem.old_output, tokens)
        return InitRows(piece_mean(problem.old_input, tokens), out,
                        {"without_pieces": sum(1 for t in tokens if not t.pieces)})


@hookimpl
def register_embedding_inits(register):
    register(MeanInit())
