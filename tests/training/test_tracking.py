"""runtime.log_with: a real training stage sends its train_log.jsonl lines to trackers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.training import tracking
from engine.training.loop import LOG_FILE


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the tensorboard event files under ``folder``: tag -> step -> value.

    Event files are TFRecord files of ``Event`` protos (length, crc, payload, crc);
    parsed with tensorboardX's copy of tensorboard's proto, independently of the writer.
    """
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def _recipe(tiny_model: Path, text_file: Path, log_with: list[str]) -> dict:
    return {"name": "tracked", "runtime": {"device": "cpu", "log_with": log_with},
            "models": {"base": {"path": str(tiny_model)}},
            "stages": [{"name": "ct", "stage": "adapt-language", "plugin": "ct", "model": "base",
                        "data": {"path": str(text_file)},
                        "params": {"steps": 6, "batch_size": 2, "seq_len": 16, "lr": 1e-3,
                                   "log_every": 4, "checkpoint_every": 0}}]}


def test_tensorboard_scalars_match_train_log(tiny_model, text_file, tmp_path, lingoforge_run_recipe):
    pytest.importorskip("tensorboardX")
    report = lingoforge_run_recipe(_recipe(tiny_model, text_file, ["tensorboard"]))
    assert report["finished"]
    work = tmp_path / "work"
    lines = [json.loads(x) for x in (work / "ct" / LOG_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    scalars = read_scalars(work / "trackers" / "tensorboard" / "ct")
    keys = ("loss", "lr", "tok_s", "grad_norm", "tokens", "elapsed_s")
    assert set(scalars) == {f"train/{k}" for k in keys}
    for key in keys:
        logged = scalars[f"train/{key}"]
        assert sorted(logged) == [x["step"] for x in lines], key
        for line in lines:  # event files store float32
            assert logged[line["step"]] == pytest.approx(line[key], rel=1e-6, abs=1e-12), (key, line["step"])


def test_trackers_are_closed_when_the_stage_fails(make_context, tiny_model, tiny_tokenizer, text_file):
    pytest.importorskip("tensorboardX")
    import torch

    from engine.api import DataSource
    from engine.core.errors import TrainingError
    from engine.training.batching import training_batches
    from engine.training.loop import TrainerParams, train

    ctx = make_context("boom", log_with=["tensorboard"])
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    params = TrainerParams(steps=4, batch_size=2, seq_len=16, lr=1e9, log_every=1, max_grad_norm=0)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2, seed=0)
    opened: list[tracking.StageTrackers] = []
    real_open = tracking.open_trackers

    def spy(context, main=True):
        opened.append(real_open(context, main))
        return opened[-1]

    tracking.open_trackers = spy
    try:
        with pytest.raises(TrainingError, match="loss became"):
            train(ctx, model, batches, params)
    finally:
        tracking.open_trackers = real_open
    assert len(opened) == 1 and opened[0].trackers == []  # finished and dropped
    assert read_scalars(ctx.workdir / "trackers" / "tensorboard" / "boom")["train/loss"]


def test_missing_tracker_package_is_a_validate_error(tiny_model, text_file, monkeypatch):
    from engine.recipe.spec import parse_recipe
    from engine.recipe.validate import plan_recipe

    real = tracking._installed
    monkeypatch.setattr(tracking, "_installed", lambda m: False if m == "wandb" else real(m))
    recipe = parse_recipe(_recipe(tiny_model, text_file, ["wandb"]), "r.yaml")
    with pytest.raises(RecipeError) as info:
        plan_recipe(recipe, Path("."), "r.yaml")
    message = str(info.value)
    assert "r.yaml: stage 'ct': runtime.log_with: 'wandb' needs the wandb package" in message
    assert "pip install wandb" in message
    monkeypatch.setattr(tracking, "_installed", lambda m: False)
    with pytest.raises(RecipeError, match=r"lingoforge\[tracking\]"):
        tracking.check_log_with(["tensorboard"])
