"""The training and layer-selection plugins, each run through ``run(context, inputs, params)``.

Test names carry the plugin name (ct, sft, elo, first_last, indices) so that
``pytest -k <plugin>`` selects one plugin's tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import state

from engine.api import DataSource, LayerSelection, ModelArtifact, StageInputs
from engine.core.errors import DataError, ModelLoadError, TrainingError
from engine.models import modelio
from engine_plugins.ct import CT
from engine_plugins.elo import ELO
from engine_plugins.elo_align import ELOAlign
from engine_plugins.first_last import FirstLast
from engine_plugins.indices import Indices
from engine_plugins.sft import SFT

FAST = {"steps": 3, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "log_every": 3}


def _loads(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


def _config(model: Path) -> dict:
    return json.loads((model / "config.json").read_text())


def _text(path: Path, **kw) -> list[DataSource]:
    return [DataSource(path, "text", **kw)]


# --- ct ------------------------------------------------------------------------------------


def test_ct_trains_full_model_and_saves_loadable_folder(make_context, tiny_model, text_file):
    ctx = make_context("ct-out")
    art = CT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=_text(text_file)),
                   CT.Params(**FAST))
    assert art.path == ctx.output_dir and (art.path / "train_log.jsonl").is_file()
    _loads(art.path)
    before, after = state(tiny_model), state(art.path)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert ctx.stats.tokens == 3 * 2 * 16
    assert ctx.stats.trainable_params == ctx.stats.forward_params


def test_ct_with_layers_trains_only_those(make_context, tiny_model, text_file):
    ctx = make_context("ct-layers")
    sel = LayerSelection(name="sel", indices=[1, 3], num_layers=4)
    art = CT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), layers=sel,
                                    data=_text(text_file)), CT.Params(**FAST))
    before, after = state(tiny_model), state(art.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.layers.3.")) for k in changed)
    assert modelio.read_meta(art.path)["trained_layers"] == [1, 3]
    assert ctx.stats.trainable_params < ctx.stats.forward_params


def test_ct_layers_errors(make_context, tiny_model, text_file, instructions_file):
    base = ModelArtifact("base", tiny_model)
    sel = LayerSelection(name="sel", indices=[0], num_layers=4)
    with pytest.raises(TrainingError, match="given twice"):
        CT().run(make_context("ct-twice"), StageInputs(model=base, layers=sel, data=_text(text_file)),
                 CT.Params(**FAST, layers=[1]))
    with pytest.raises(TrainingError, match="layer index 9 is out of range"):
        CT().run(make_context("ct-range"), StageInputs(model=base, data=_text(text_file)),
                 CT.Params(**FAST, layers=[9]))
    with pytest.raises(DataError, match="ct trains on 'text' data"):
        CT().run(make_context("ct-format"), StageInputs(
            model=base, data=[DataSource(instructions_file, "instructions")]), CT.Params(**FAST))


def test_ct_static_check(tiny_model):
    cfg = _config(tiny_model)
    CT().check({"model": [cfg]}, CT.Params(layers=[0, -1]))
    with pytest.raises(ValueError, match="layer index 4 is out of range: the model has 4"):
        CT().check({"model": [cfg]}, CT.Params(layers=[4]))


def test_ct_frozen_8bit_trains_chosen_layers_and_keeps_frozen_bitwise(make_context, tiny_model, text_file):
    """layers [0, -1] train in float32 while layers 1-2 are held as LLM.int8; the output's
    frozen tensors are the input's bit for bit (copied, not dequantised)."""
    ctx = make_context("ct-8bit")
    params = CT.Params(steps=12, batch_size=4, seq_len=16, lr=1e-2, log_every=4, layers=[0, -1],
                       frozen_8bit=True)
    art = CT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=_text(text_file)), params)
    losses = [json.loads(x)["loss"] for x in (art.path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    before, after = state(tiny_model), state(art.path)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        trained = key.startswith(("model.layers.0.", "model.layers.3."))
        assert after[key].dtype == tensor.dtype, key
        if not trained:
            assert torch.equal(after[key], tensor), f"frozen {key} changed"
        elif key.endswith("proj.weight"):
            assert not torch.equal(after[key], tensor), f"trained {key} did not change"
    assert (art.path / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    _loads(art.path)
    meta = modelio.read_meta(art.path)
    assert meta["frozen_8bit"] is True and meta["trained_layers"] == [0, 3]
    memory = ctx.stats.notes["frozen_8bit"]
    assert memory["int8_modules"] == 2 * 7  # the projections of layers 1 and 2
    assert 0 < memory["model_mb"] < memory["full_precision_model_mb"]
    layer_params = sum(t.numel() for k, t in before.items() if k.startswith(("model.layers.0.", "model.layers.3.")))
    assert ctx.stats.trainable_params == layer_params


def test_ct_frozen_8bit_errors(make_context, tiny_model, text_file, monkeypatch):
    with pytest.raises(TrainingError, match="frozen_8bit needs a layer selection"):
        CT().run(make_context("ct-8-none"), StageInputs(model=ModelArtifact("base", tiny_model),
                                                        data=_text(text_file)), CT.Params(**FAST, frozen_8bit=True))
    with pytest.raises(ValueError, match="frozen_8bit and lora cannot be combined"):
        CT.Params(layers=[0], frozen_8bit=True, lora={})
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ValueError, match=r"frozen_8bit needs bitsandbytes.*lingoforge\[8bit\]"):
        CT.Params(layers=[0], frozen_8bit=True)


# --- sft -----------------------------------------------------------------------------------


def test_sft_trains_on_prompt_response_data(make_context, tiny_model, instructions_file):
    ctx = make_context("sft-out")
    data = [DataSource(instructions_file, "instructions")]
    art = SFT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=data),
                    SFT.Params(**{**FAST, "seq_len": 48}))
    model = _loads(art.path)
    assert model.config.num_hidden_layers == 4
    log = [json.loads(x) for x in (art.path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and ctx.stats.tokens > 0


def test_sft_long_prompt_fails_before_model_load_naming_file_and_line(make_context, tiny_model, tmp_path,
                                                                       monkeypatch):
    f = tmp_path / "long.jsonl"
    rows = [{"prompt": f"question {i} answer", "response": " yes"} for i in range(40)]
    rows[29] = {"prompt": "the cat sits on the mat " * 10, "response": " no"}  # line 30, the last batch
    rows[35] = {"messages": [{"role": "user", "content": "a small model learns " * 10},
                             {"role": "assistant", "content": " ok"}]}  # line 36
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ctx = make_context("sft-long")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(ctx, "load_model", no_model)
    with pytest.raises(DataError, match=r"2 of 40 instruction record\(s\) cannot be trained on with seq_len 24"
                                        r"(.|\n)*long.jsonl:30: the prompt is \d+ tokens but seq_len is 24"
                                        r"(.|\n)*long.jsonl:36: the prompt is"):
        SFT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=[DataSource(f, "instructions")]),
                  SFT.Params(**{**FAST, "seq_len": 24}))
    assert not (ctx.output_dir / "train_log.jsonl").exists()


def test_sft_refuses_raw_text(make_context, tiny_model, text_file):
    with pytest.raises(DataError, match="sft trains on 'instructions' data"):
        SFT().run(make_context("sft-text"), StageInputs(model=ModelArtifact("base", tiny_model),
                                                        data=_text(text_file)), SFT.Params(**FAST))


# --- elo and elo-align ------------------------------------------------------------------------


@pytest.fixture
def elo_submodel(make_context, tiny_model, tmp_path) -> tuple[ModelArtifact, object]:
    target, source = tmp_path / "target.txt", tmp_path / "source.txt"
    target.write_text("lum vela dora sen kato lumi vel ados kira nen\n" * 8)
    source.write_text("the cat sits on the mat and the dog runs in the park\n" * 8)
    data = [DataSource(target, weight=9.0), DataSource(source, weight=1.0)]
    ctx = make_context("elo-sub")
    art = ELO().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=data), ELO.Params(**FAST))
    return art, ctx


def test_elo_builds_and_trains_detached_end_layers(elo_submodel, tiny_model):
    art, ctx = elo_submodel
    model = _loads(art.path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    meta = modelio.read_meta(art.path)
    assert meta["kind"] == "elo-submodel" and meta["layer_indices"] == [0, 3]
    assert meta["source_model"] == str(tiny_model.resolve()) and meta["source_num_layers"] == 4
    full, sub = state(tiny_model), state(art.path)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(full[key], sub[key]), f"{key} should be frozen"
    assert not torch.equal(full["model.layers.3.mlp.up_proj.weight"], sub["model.layers.1.mlp.up_proj.weight"])
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    assert ctx.stats.trainable_params == layer_params
    assert ctx.stats.forward_params == sum(p.numel() for p in model.parameters())


def test_elo_train_embeddings_trains_embedding_and_head_and_align_puts_them_back(
        make_context, tiny_model, text_file):
    ctx = make_context("elo-emb")
    art = ELO().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=_text(text_file)),
                    ELO.Params(**FAST, train_embeddings=True))
    meta = modelio.read_meta(art.path)
    assert meta["train_embeddings"] is True
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(meta["trained_tensors"])
    assert "model.norm.weight" not in meta["trained_tensors"]
    full, sub = state(tiny_model), state(art.path)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(full[key], sub[key]), f"{key} should have trained"
    assert torch.equal(full["model.norm.weight"], sub["model.norm.weight"])
    model = _loads(art.path)
    expected = sum(p.numel() for p in model.model.layers.parameters()) + \
        model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert ctx.stats.trainable_params == expected
    assert ctx.stats.notes["elo_trained_embeddings"] == ["model.embed_tokens.weight", "lm_head.weight"]

    aligned = ELOAlign().run(make_context("elo-emb-aligned", stage_kind="align"), StageInputs(model=art),
                             ELOAlign.Params(steps=0))
    out = state(aligned.path)
    for key, tensor in out.items():
        if key.startswith(("model.layers.1.", "model.layers.2.")) or key == "model.norm.weight":
            assert torch.equal(tensor, full[key]), f"{key} should be the base's, bit for bit"
        else:  # the ends, the embedding and the head come from the sub-model
            src = key.replace("model.layers.3.", "model.layers.1.")
            assert torch.equal(tensor, sub[src]), key


def test_elo_uses_chosen_layers_and_checks(make_context, tiny_model, text_file):
    sel = LayerSelection(name="sel", indices=[1, 2], num_layers=4)
    art = ELO().run(make_context("elo-sel"), StageInputs(model=ModelArtifact("base", tiny_model), layers=sel,
                                                         data=_text(text_file)), ELO.Params(**FAST))
    assert modelio.read_meta(art.path)["layer_indices"] == [1, 2]
    cfg = _config(tiny_model)
    ELO().check({"model": [cfg]}, ELO.Params())
    with pytest.raises(ValueError, match="layer index -5 is out of range"):
        ELO().check({"model": [cfg]}, ELO.Params(layers=[0, -5]))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ELO().check({"model": [{**cfg, "model_type": "gpt2"}]}, ELO.Params())


def test_elo_align_reinserts_trained_layers(elo_submodel, make_context, tiny_model):
    sub_art, _ = elo_submodel
    ctx = make_context("elo-aligned", stage_kind="align")
    art = ELOAlign().run(ctx, StageInputs(model=sub_art), ELOAlign.Params(steps=0))
    _loads(art.path)
    full, sub, out = state(tiny_model), state(sub_art.path), state(art.path)
    for key, tensor in out.items():
        src = key.replace("model.layers.3.", "model.layers.1.")  # sub-model layer 1 is source layer 3
        if key.startswith(("model.layers.0.", "model.layers.3.")):
            assert torch.equal(tensor, sub[src]), key
        else:
            assert torch.equal(tensor, full[key]), key
    assert not torch.equal(out["model.layers.3.self_attn.q_proj.weight"],
                           full["model.layers.3.self_attn.q_proj.weight"])
    assert ctx.stats.trainable_params == 0


def test_elo_align_then_brief_full_finetune(elo_submodel, make_context, text_file):
    sub_art, _ = elo_submodel
    ctx = make_context("elo-aligned-ft", stage_kind="align")
    art = ELOAlign().run(ctx, StageInputs(model=sub_art, data=_text(text_file)),
                         ELOAlign.Params(**{**FAST, "steps": 2}))
    assert _loads(art.path).config.num_hidden_layers == 4
    assert ctx.stats.trainable_params == ctx.stats.forward_params
    assert modelio.read_meta(art.path)["alignment_steps"] == 2


def test_elo_align_input_errors(elo_submodel, make_context, tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(TrainingError, match="not an ELO sub-model"):
        ELOAlign().run(make_context("ea-bad", stage_kind="align"),
                       StageInputs(model=ModelArtifact("base", tiny_model)), ELOAlign.Params(steps=0))
    from conftest import build_tiny_llama

    other = build_tiny_llama(tmp_path / "three", num_layers=3, tokenizer=tiny_tokenizer)
    sub_art, _ = elo_submodel
    with pytest.raises(TrainingError, match="cut from a 4-layer model; the base has 3"):
        ELOAlign().run(make_context("ea-base", stage_kind="align"),
                       StageInputs(model=sub_art, base=ModelArtifact("other", other)), ELOAlign.Params(steps=0))
    moved = tmp_path / "moved-sub"
    shutil.copytree(sub_art.path, moved)
    meta = modelio.read_meta(moved)
    modelio.write_meta(moved, {**meta, "source_model": str(tmp_path / "gone")})
    with pytest.raises(ModelLoadError, match="gone.*does not exist; give it as the 'base' input"):
        ELOAlign().run(make_context("ea-gone", stage_kind="align"),
                       StageInputs(model=ModelArtifact("sub", moved)), ELOAlign.Params(steps=0))


# --- selectors -------------------------------------------------------------------------------


def _select(plugin, make_context, model: Path, **params):
    ctx = make_context("sel", stage_kind="select-layers")
    return plugin.run(ctx, StageInputs(model=ModelArtifact("base", model)), plugin.Params(**params))


def test_first_last_picks_ends(make_context, tiny_model):
    sel = _select(FirstLast(), make_context, tiny_model)
    assert (sel.name, sel.indices, sel.num_layers) == ("sel", [0, 3], 4) and "first 1 and last 1" in sel.explanation
    assert _select(FirstLast(), make_context, tiny_model, first=2, last=1).indices == [0, 1, 3]
    assert _select(FirstLast(), make_context, tiny_model, first=0, last=2).indices == [2, 3]


def test_first_last_errors(make_context, tiny_model):
    with pytest.raises(ValueError, match="both 0"):
        FirstLast.Params(first=0, last=0)
    with pytest.raises(TrainingError, match="first=5 asks for more layers than the model's 4"):
        _select(FirstLast(), make_context, tiny_model, first=5)
    with pytest.raises(ValueError, match="last=9"):
        FirstLast().check({"model": [_config(tiny_model)]}, FirstLast.Params(last=9))
    FirstLast().check({"model": [_config(tiny_model)]}, FirstLast.Params())


def test_indices_picks_and_normalises(make_context, tiny_model):
    sel = _select(Indices(), make_context, tiny_model, indices=[-1, 0])
    assert sel.indices == [0, 3] and sel.num_layers == 4


def test_indices_errors(make_context, tiny_model):
    with pytest.raises(TrainingError, match="layer index 4 is out of range: the model has 4 decoder layers"):
        _select(Indices(), make_context, tiny_model, indices=[4])
    with pytest.raises(ValueError, match="-1 names layer 3 again"):
        Indices().check({"model": [_config(tiny_model)]}, Indices.Params(indices=[3, -1]))
    with pytest.raises(ValueError):
        Indices.Params(indices=[])


def test_plugins_registered_ct_sft_elo_first_last_indices():
    from engine.registry.manager import implementations

    impls = implementations()
    assert {"ct", "sft", "elo"} <= set(impls["adapt-language"])
    assert "elo-align" in impls["align"]
    assert {"first-last", "indices"} <= set(impls["select-layers"])


# --- layer-importance -------------------------------------------------------------------------


def _with_identity_layers(src: Path, dst: Path, identity: list[int]) -> Path:
    """A copy of ``src`` whose layers ``identity`` add nothing to the residual stream."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    weights = state(dst)
    for key in weights:
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if layer is not None and int(layer) in identity and key.endswith(("o_proj.weight", "down_proj.weight")):
            weights[key] = torch.zeros_like(weights[key])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_layer_importance_picks_layers_that_transform_text(make_context, tiny_model, text_file, tmp_path):
    from engine_plugins.layer_importance import LayerImportance

    model = _with_identity_layers(tiny_model, tmp_path / "ident", [0, 2])
    ctx = make_context("importance", stage_kind="select-layers")
    sel = LayerImportance().run(ctx, StageInputs(model=ModelArtifact("m", model), data=_text(text_file)),
                                LayerImportance.Params(k=2, seq_len=16, batches=2, batch_size=2))
    assert sel.indices == [1, 3] and sel.num_layers == 4
    assert sel.scores[0] == pytest.approx(0, abs=1e-6) and sel.scores[2] == pytest.approx(0, abs=1e-6)
    assert min(sel.scores[1], sel.scores[3]) > 1e-3
    assert "layers [1, 3] of 4" in sel.explanation and "1 - cos" in sel.explanation
    assert ctx.stats.notes["layers"] == [1, 3] and set(ctx.stats.notes["layer_scores"]) == {"0", "1", "2", "3"}
    assert ctx.stats.tokens == 2 * 2 * 16

    pinned = LayerImportance().run(make_context("pinned", stage_kind="select-layers"),
                                   StageInputs(model=ModelArtifact("m", model), data=_text(text_file)),
                                   LayerImportance.Params(k=2, always_include=[0], seq_len=16, batches=1))
    assert pinned.indices[0] == 0 and pinned.indices[1] in (1, 3) and "pinned" in pinned.explanation


def test_layer_importance_errors(make_context, tiny_model, text_file, instructions_file):
    from engine_plugins.layer_importance import LayerImportance

    cfg = _config(tiny_model)
    with pytest.raises(ValueError, match="k=5 asks for more layers than the model's 4"):
        LayerImportance().check({"model": [cfg]}, LayerImportance.Params(k=5))
    with pytest.raises(ValueError, match="always_include has 2 layers, more than k=1"):
        LayerImportance().check({"model": [cfg]}, LayerImportance.Params(k=1, always_include=[0, -1]))
    with pytest.raises(ValueError, match="layer index 7 is out of range"):
        LayerImportance().check({"model": [cfg]}, LayerImportance.Params(k=1, always_include=[7]))
    with pytest.raises(DataError, match="layer-importance trains on 'text' data"):
        LayerImportance().run(make_context("li"), StageInputs(model=ModelArtifact("m", tiny_model),
                                                              data=[DataSource(instructions_file, "instructions")]),
                              LayerImportance.Params())
