"""The ``slack-ties`` merge method: TIES that keeps a protected model's important deltas.

This is lingoforge's reading of TIES-SV (Tao et al. 2024, arXiv 2407.03994), whose
exact formula is not public; docs/merging.md states the formula and why it works.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.errors import MergeError
from engine.api.merging import (
    Positionwise,
    PositionwiseMerge,
    TiesParams,
    check_static,
    check_weight_sum,
    for_tensor,
    resolve_per_model,
    run_merge,
    slack_ties_combine,
)


class SlackTies:
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

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        names = check_static(configs, params)
        if names and params.protect is not None and params.protect not in names:
            raise MergeError(f"params.protect names {params.protect!r}, which is not merged "
                             f"here; the models of this merge are {names}")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        names = [m.name for m in inputs.models]
        if not names:
            raise MergeError("slack-ties needs at least one model (recipe key 'models')")
        protected = params.protect if params.protect is not None else names[-1]
        counts = {"protected": protected, "important": 0, "kept_by_ties": 0, "kept": 0}

        def build(p: SlackTies.Params):
            weights = resolve_per_model(p.weight, names, "weight")
            densities = resolve_per_model(p.density, names, "density")
            check_weight_sum(weights, names, normalize=p.normalize)
            prot = p.protect if p.protect is not None else protected
            if prot not in names:
                raise MergeError(f"params.protect names {prot!r}, which is not merged here; "
                                 f"the models of this merge are {names}")
            index = names.index(prot)

            def merge(trimmed):  # on a whole tensor or a slice of rows: the counts add up
                result = slack_ties_combine(trimmed, weights, protect=index, slack=p.slack,
                                            normalize=p.normalize, lam=p.lambda_)
                for key in ("important", "kept_by_ties", "kept"):
                    counts[key] += getattr(result, key)
                return result.delta

            return Positionwise(merge, densities=tuple(densities))

        artifact = run_merge(context, inputs, params, PositionwiseMerge(for_tensor(params, build)),
                             meta={"slack_ties": counts})
        if counts["important"]:
            context.note("slack_ties", {
                **counts,
                "kept_fraction": counts["kept"] / counts["important"],
                "kept_fraction_ties": counts["kept_by_ties"] / counts["important"],
            })
        return artifact


@hookimpl
def register_merge_methods(register):
    register(SlackTies())
