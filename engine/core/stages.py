"""The one table of stage kinds.

Everything the engine knows about a stage kind is one :class:`StageKind` entry in
:data:`STAGE_KINDS`: the recipe schema (its ``stage:`` values and the input keys each
kind takes), ``engine validate`` (which inputs are required, which references must be
models), the runner (which artifact a stage returns, whether its stages train and so
take a seed and a checkpoint) and the docs (``engine schema --markdown``) are all read
from it. Adding a stage kind is one entry here plus its hookspec in
:mod:`engine.registry.hookspecs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ADAPT_LANGUAGE", "ALIGN", "EVALUATE", "INPUT_KEYS", "MERGE", "SELECT_LAYERS", "STAGE_KINDS",
    "ArtifactType", "StageKind", "kind_of", "model_kinds", "training_kinds",
]

ArtifactType = Literal["model", "layers", "metrics"]
#: every input key a stage may have in a recipe, in the order the docs list them
INPUT_KEYS: tuple[str, ...] = ("model", "models", "base", "layers", "data")


@dataclass(frozen=True)
class StageKind:
    """One stage kind.

    ``hook`` is the register hook that collects its implementations; ``required`` and
    ``optional`` the recipe input keys it takes (a subset of :data:`INPUT_KEYS`);
    ``artifact`` what its ``run`` returns (``model``: a
    :class:`~engine.core.artifacts.ModelArtifact`, ``layers``: a
    :class:`~engine.core.artifacts.LayerSelection`, ``metrics``: a
    :class:`~engine.core.artifacts.MetricsArtifact`); ``trains``: its stages train (they
    are seeded, checkpointed and resumable); ``summary``: one line for the docs;
    ``loads_models``: its stages load whole models (all but merges, which stream).
    """

    name: str
    hook: str
    required: frozenset[str]
    optional: frozenset[str]
    artifact: ArtifactType
    trains: bool
    summary: str
    #: what an implementation of this kind promises, beyond inputs and artifact: the
    #: hookspec's docstring is built from it (see :mod:`engine.registry.hookspecs`)
    contract: str = ""
    #: its stages load models through transformers, so the runner imports the input
    #: models' modelling code before the first such stage (a merge streams tensors and
    #: needs none: a merge-only run never pays for it)
    loads_models: bool = True

    @property
    def produces_model(self) -> bool:
        return self.artifact == "model"

    @property
    def accepted(self) -> frozenset[str]:
        return self.required | self.optional


def _kind(name: str, hook: str, required: set[str], optional: set[str], artifact: ArtifactType,
          trains: bool, summary: str, contract: str = "", *, loads_models: bool = True
          ) -> StageKind:
    unknown = (required | optional) - set(INPUT_KEYS)
    assert not unknown, f"stage kind {name}: unknown input keys {unknown}"
    return StageKind(name, hook, frozenset(required), frozenset(optional), artifact, trains,
                     summary, " ".join(contract.split()), loads_models)


ADAPT_LANGUAGE = "adapt-language"
SELECT_LAYERS = "select-layers"
MERGE = "merge"
ALIGN = "align"
EVALUATE = "evaluate"

#: stage kind name -> its entry, in pipeline order
STAGE_KINDS: dict[str, StageKind] = {k.name: k for k in (
    _kind(ADAPT_LANGUAGE, "register_language_adapters", {"model", "data"}, {"layers"}, "model",
          True, "train a model on text or instructions (CT, SFT, ELO's detached layers)",
          """Continual pretraining, supervised fine-tuning, ELO's detached-layer training.
          ``layers`` is the output of a select-layers stage: train only those layers."""),
    _kind(SELECT_LAYERS, "register_layer_selectors", {"model"}, {"data"}, "layers", False,
          "choose which decoder layers a later stage trains",
          """The returned selection's ``explanation`` says why these layers. Simple
          selectors read only the model's config; data-driven ones read ``data``."""),
    _kind(MERGE, "register_merge_methods", {"models"}, {"base"}, "model", False,
          "combine models (each optionally relative to a base) into one",
          """Methods on task vectors need ``base``. A merge streams tensor by tensor
          (``engine.api.merging``: the merge-method base), so that peak memory stays a few
          tensors whatever the model size, and honours every param it advertises.""",
          loads_models=False),
    _kind(ALIGN, "register_aligners", {"model"}, {"base", "data"}, "model", True,
          "re-integrate separately trained parts into a full model, then fine-tune briefly",
          """ELO's layer alignment: ``model`` is the trained part (an ELO sub-model),
          ``base`` the full model to put it back into (default: the model the part was
          detached from), ``data`` the brief full fine-tune's data."""),
    _kind(EVALUATE, "register_evaluators", {"models", "data"}, set(), "metrics", False,
          "score models on data and write metrics.json",
          """The returned metrics map each model name to its metrics; the runner writes
          them to ``<workdir>/<stage>/metrics.json``. Failures of one model are recorded
          in ``errors`` and do not stop the others."""),
)}


def kind_of(name: str) -> StageKind:
    """The entry of stage kind ``name``; a KeyError names the known kinds."""
    try:
        return STAGE_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(STAGE_KINDS)}") from None


def model_kinds() -> frozenset[str]:
    """The stage kinds whose output is a model (what ``model``/``models``/``base`` may name)."""
    return frozenset(k.name for k in STAGE_KINDS.values() if k.produces_model)


def training_kinds() -> frozenset[str]:
    return frozenset(k.name for k in STAGE_KINDS.values() if k.trains)
