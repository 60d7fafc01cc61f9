"""Artifacts save themselves into a stage folder and load themselves back
(engine/core/artifacts.py), picked from the stage-kind table as the runner does."""

from __future__ import annotations

import json

import pytest

from engine.core.artifacts import (
    ARTIFACT_TYPES,
    LAYERS_FILE,
    METRICS_FILE,
    LayerSelection,
    MetricsArtifact,
    ModelArtifact,
    load_artifact,
)
from engine.core.stages import STAGE_KINDS


def test_layer_selection_round_trips_through_its_folder(tmp_path):
    sel = LayerSelection("picked", [0, 3], 4, "ends", {0: 1.5, 3: 0.25})
    sel.save(tmp_path)
    assert json.loads((tmp_path / LAYERS_FILE).read_text()) == sel.to_json()
    assert LayerSelection.load("picked", tmp_path) == sel
    assert LayerSelection.from_json("picked", sel.to_json()) == sel
    assert sel.relocated(tmp_path / "elsewhere") is sel


def test_metrics_round_trip_through_their_folder(tmp_path):
    art = MetricsArtifact("eval", {"base": {"ppl/en": 12.5}, "tuned": {"ppl/en": 9.0}},
                          {"base": {"ppl/en": 640}}, {"broken": "no such model"})
    art.save(tmp_path)
    data = json.loads((tmp_path / METRICS_FILE).read_text())
    assert data == art.to_json() and data["_errors"] == {"broken": "no such model"}
    assert MetricsArtifact.load("eval", tmp_path) == art
    assert MetricsArtifact.from_json("eval", art.to_json()) == art
    plain = MetricsArtifact("eval", {"m": {"acc": 1.0}})
    assert "_errors" not in plain.to_json() and MetricsArtifact.from_json("eval", plain.to_json()) == plain


def test_model_artifact_saves_by_moving_in_and_loads_its_meta(tmp_path):
    elsewhere, folder = tmp_path / "written-elsewhere", tmp_path / "stage"
    elsewhere.mkdir()
    folder.mkdir()
    (elsewhere / "config.json").write_text("{}")
    (elsewhere / "lingoforge.json").write_text(json.dumps({"kind": "elo"}))
    art = ModelArtifact("m", elsewhere, {"kind": "elo"})
    art.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "lingoforge.json"]
    assert ModelArtifact.load("m", folder) == ModelArtifact("m", folder, {"kind": "elo"})
    in_place = ModelArtifact("m", folder, {"kind": "elo"})
    in_place.save(folder)  # already there: nothing moves
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "lingoforge.json"]
    (folder / "lingoforge.json").unlink()
    assert in_place.relocated(tmp_path / "final").meta == {"kind": "elo"}  # kept when none on disk


@pytest.mark.parametrize("kind", sorted(STAGE_KINDS))
def test_every_stage_kind_names_an_artifact_class_that_round_trips(kind, tmp_path):
    artifact_type = STAGE_KINDS[kind].artifact
    cls = ARTIFACT_TYPES[artifact_type]
    assert cls.kind == artifact_type
    sample = {"model": ModelArtifact("s", tmp_path), "layers": LayerSelection("s", [1], 2),
              "metrics": MetricsArtifact("s", {"m": {"ppl": 3.0}})}[artifact_type]
    sample.save(tmp_path)
    assert load_artifact(artifact_type, "s", tmp_path) == sample
