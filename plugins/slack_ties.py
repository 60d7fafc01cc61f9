"""The ``slack-ties`` merge method: TIES that keeps a protected model's important deltas.

This is lingoforge's reading of TIES-SV (Tao et al. 2024, arXiv 2407.03994), whose
exact formula is not public; docs/merging.md states the formula and why it works.
"""

from __future__ import annotations

from pydantic import Field

from engine.api import hookimpl
from engine.api.errors import MergeError
from engine.api.merging import MagnitudeBand, MergeMethod, TiesParams, slack_ties_combine

_COUNTS = ("important", "kept_by_ties", "kept")


class SlackTies(MergeMethod):
    """slack-TIES: TIES whose sign election lets the protected model win by a slack."""

    name = "slack-ties"

    class Params(TiesParams):
        """slack-TIES's parameters: TIES's, plus which model is protected and the slack."""

        protect: str | None = Field(
            None, description="Name of the model whose important (top-density) deltas are "
                              "protected, e.g. the SFT/task model; default: the last model.")
        slack: float = Field(
            0.5, ge=0, le=1,
            description="Slack of the sign election for the protected model: its important "
                        "delta is kept unless the opposing weighted mass exceeds it by more "
                        "than a factor 1/(1 - slack). 0 is TIES exactly; 1 always keeps it.")

    def check_params(self, p):
        protect = p.peek("protect")
        if protect is not None and protect not in p.names:
            raise MergeError(f"params.protect names {protect!r}, which is not merged here; "
                             f"the models of this merge are {list(p.names)}")

    def bands(self, p):
        return [MagnitudeBand(d) for d in p.density]

    def merge(self, trimmed, p, tensor):  # on a whole tensor or a slice of rows: counts add up
        index = p.names.index(p.protect if p.protect is not None else p.names[-1])
        result = slack_ties_combine(trimmed, p.weight, protect=index, slack=p.slack,
                                    normalize=p.normalize, lam=p.lambda_)
        for key in _COUNTS:
            tensor.tally[key] += getattr(result, key)
        return result.delta

    def report(self, context, params, names, tally):
        counts = {"protected": params.protect if params.protect is not None else names[-1],
                  **{key: int(tally[key]) for key in _COUNTS}}
        if counts["important"]:
            context.note("slack_ties", {
                **counts,
                "kept_fraction": counts["kept"] / counts["important"],
                "kept_fraction_ties": counts["kept_by_ties"] / counts["important"],
            })
        return {"slack_ties": counts}


@hookimpl
def register_merge_methods(register):
    register(SlackTies())
