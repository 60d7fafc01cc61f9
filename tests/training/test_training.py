"""The shared training loop, batching and architecture access, on real tiny models."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import DataSource
from engine.core.errors import DataError, TrainingError
from engine.models import arch
from engine.training.batching import (
    instruction_batches,
    pack,
    packed_batches,
    packed_blocks,
    training_batches,
)
from engine.training.examples import IGNORE_INDEX
from engine.training.loop import LOG_FILE, TrainerParams, lr_factor, train

# --- the loop ----------------------------------------------------------------------------


def _run(make_context, tiny_model, tiny_tokenizer, text_file, name="train", **overrides):
    params = TrainerParams(**{"steps": 12, "batch_size": 4, "seq_len": 16, "lr": 3e-3,
                              "log_every": 4, **overrides})
    ctx = make_context(name)
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=params.seq_len,
                               batch_size=params.micro_batch_size, seed=params.seed)
    return ctx, train(ctx, model, batches, params)


def test_loop_loss_decreases_and_logs(make_context, tiny_model, tiny_tokenizer, text_file):
    ctx, result = _run(make_context, tiny_model, tiny_tokenizer, text_file, steps=20, warmup_steps=2)
    assert len(result.losses) == 20
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.3
    lines = [json.loads(x) for x in (ctx.output_dir / LOG_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    assert {"loss", "lr", "tok_s", "tokens", "grad_norm"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(3e-3 / 2) and lines[-1]["lr"] < 1e-4  # warmup, cosine
    assert ctx.stats.tokens == result.state.tokens == 20 * 4 * 16
    total = sum(p.numel() for p in result.model.parameters())
    assert ctx.stats.trainable_params == ctx.stats.forward_params == total


def test_loop_is_deterministic_given_seed(make_context, tiny_model, tiny_tokenizer, text_file):
    _, a = _run(make_context, tiny_model, tiny_tokenizer, text_file, name="a", steps=5)
    _, b = _run(make_context, tiny_model, tiny_tokenizer, text_file, name="b", steps=5)
    _, c = _run(make_context, tiny_model, tiny_tokenizer, text_file, name="c", steps=5, seed=1)
    assert a.losses == b.losses and a.losses != c.losses
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_loop_grad_accum_matches_one_big_batch(make_context, tiny_model, tiny_tokenizer, text_file):
    _, one = _run(make_context, tiny_model, tiny_tokenizer, text_file, name="one", steps=3)
    _, acc = _run(make_context, tiny_model, tiny_tokenizer, text_file, name="acc", steps=3, grad_accum=2)
    assert acc.losses == pytest.approx(one.losses, rel=1e-4)


def test_loop_nan_loss_stops_with_step(make_context, tiny_model, tiny_tokenizer, text_file):
    ctx = make_context("nan")
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    params = TrainerParams(steps=3, batch_size=2, seq_len=16, log_every=10)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2)
    with pytest.raises(TrainingError, match=r"loss became nan at step 1 of 3"):
        train(ctx, model, batches, params)


def test_loop_nothing_trainable_is_an_error(make_context, tiny_model, tiny_tokenizer, text_file):
    ctx = make_context("frozen")
    model = ctx.load_model(tiny_model).requires_grad_(False)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2)
    with pytest.raises(TrainingError, match="nothing to train"):
        train(ctx, model, batches, TrainerParams(steps=1, batch_size=2, seq_len=16))


def test_loop_adamw_8bit_and_bf16_run_on_cpu(make_context, tiny_model, tiny_tokenizer, text_file):
    _, res = _run(make_context, tiny_model, tiny_tokenizer, text_file, steps=2, optimizer="adamw-8bit",
                  mixed_precision="bf16")
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert next(res.model.parameters()).dtype == torch.float32


def test_loop_params_validation(make_context, tiny_model, tiny_tokenizer, text_file):
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        TrainerParams(batch_size=3, grad_accum=2)
    with pytest.raises(TrainingError, match="fp16.*CUDA"):
        _run(make_context, tiny_model, tiny_tokenizer, text_file, steps=1, mixed_precision="fp16")


def test_lr_schedules():
    assert lr_factor(0, total=10, warmup=2, schedule="cosine") == 0.5
    assert lr_factor(2, total=10, warmup=2, schedule="cosine") == 1.0
    assert lr_factor(6, total=10, warmup=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(6, total=10, warmup=2, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(9, total=10, warmup=0, schedule="constant") == 1.0


# --- batching ------------------------------------------------------------------------------


def test_packing_fills_blocks_with_bos_text_eos_documents(tiny_tokenizer, text_file):
    """Documents are packed as models are pretrained and evaluators score them:
    ``BOS text EOS`` (this tokenizer adds neither itself)."""
    docs = text_file.read_text().split("\n")[:-1]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert tiny_tokenizer(docs[0])["input_ids"][0] != bos
    stream = [t for d in docs for t in [bos, *tiny_tokenizer(d)["input_ids"], eos]]
    blocks = list(itertools.islice(packed_blocks(tiny_tokenizer, [DataSource(text_file)], seq_len=16,
                                                 shuffle_buffer=1), len(stream) // 16))
    assert all(len(b) == 16 for _, b in blocks)
    assert [t for _, b in blocks for t in b] == stream[: len(blocks) * 16]
    assert list(pack([[1, 2, 3], [4, 5, 6, 7]], 3)) == [[1, 2, 3], [4, 5, 6]]


def test_mixing_follows_weights(tmp_path, tiny_tokenizer):
    target, source = tmp_path / "t.txt", tmp_path / "s.txt"
    target.write_text("lum vela dora sen kato lumi vel ados kira nen\n" * 3)
    source.write_text("the cat sits on the mat and the dog runs\n" * 3)
    sources = [DataSource(target, weight=9.0), DataSource(source, weight=1.0)]
    picks = [i for i, _ in itertools.islice(packed_blocks(tiny_tokenizer, sources, seq_len=8), 100)]
    assert picks.count(0) == 90
    assert all(picks[k:k + 10].count(1) == 1 for k in range(0, 100, 10))


def test_batches_are_deterministic_and_endless(tiny_tokenizer, text_file):
    def first(seed):
        it = packed_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2, seed=seed)
        return [b["input_ids"] for b in itertools.islice(it, 40)]  # far more than one epoch

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_prompt_masking_of_sft_batches(tiny_tokenizer, instructions_file):
    batch = next(instruction_batches(tiny_tokenizer, [DataSource(instructions_file, "instructions")],
                                     seq_len=64, batch_size=4, seed=0))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows = [json.loads(x) for x in instructions_file.read_text().splitlines()]
    responses = {tiny_tokenizer.decode(tiny_tokenizer(r["response"])["input_ids"]) for r in rows}
    for row in range(4):
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(kept[:-1]) in responses  # only the response is learned
        n = int(mask[row].sum())
        assert torch.equal(labels[row, n - len(kept): n], ids[row, n - len(kept): n])
        assert (labels[row, n:] == IGNORE_INDEX).all() and (mask[row, n:] == 0).all()


def test_prompt_masking_with_chat_template(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "what color is the sky"},
                                          {"role": "assistant", "content": " blue"}]}) + "\n")
    batch = next(instruction_batches(tok, [DataSource(f, "instructions")], seq_len=64, batch_size=1))
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tok.decode(kept).strip() == "blue</s>"  # the turn after the generation prompt only


def test_instructions_encoded_in_batches_match_one_at_a_time(tiny_tokenizer):
    """The batched encoding training uses gives every record the ids encode_instruction
    gives it alone: single- and multi-turn, with and without a chat template."""
    from engine.training.examples import encode_instruction, encode_instructions

    records = [{"prompt": "what color is the sky", "response": " blue"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo"},
                             {"role": "user", "content": "and then?"},
                             {"role": "assistant", "content": " then more"}]},
               {"messages": [{"role": "assistant", "content": "alone"}]},
               {"prompt": "é ü ß", "response": " ok."}]
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    for tok in (plain, chat):
        one = [encode_instruction(tok, r) for r in records]
        assert encode_instructions(tok, records) == one
        assert all(response for _, response in one)
    assert encode_instructions(chat, []) == []


def test_long_prompt_and_empty_file_are_data_errors(tmp_path, tiny_tokenizer):
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n"
                 + json.dumps({"prompt": "the cat sits " * 20, "response": "y"}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: the prompt is \d+ tokens but seq_len is 16"):
        list(itertools.islice(instruction_batches(tiny_tokenizer, [DataSource(f, "instructions")],
                                                  seq_len=16, batch_size=2, shuffle_buffer=1), 2))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: no usable records"):
        next(packed_batches(tiny_tokenizer, [DataSource(empty)], seq_len=16, batch_size=1))


# --- architecture access and detached sub-models --------------------------------------------


def test_arch_errors_name_model_type_and_index(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    with pytest.raises(TrainingError, match="'gpt2'.*supported: llama"):
        arch.check_supported({**cfg, "model_type": "gpt2"})
    with pytest.raises(arch.LayerIndexError, match="layer index 4 is out of range: the model has 4"):
        arch.resolve_indices([0, 4], 4)
    with pytest.raises(arch.LayerIndexError, match="-1 names layer 3 again"):
        arch.resolve_indices([3, -1], 4)
    assert arch.resolve_indices([-1, 0], 4) == [0, 3]


def test_submodel_config_keeps_layer_types():
    from transformers import Qwen2Config

    cfg = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2,
                      hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    sub = arch.submodel_config(cfg, [0, -1])
    assert sub.num_hidden_layers == 2 and sub.layer_types == [cfg.layer_types[0], cfg.layer_types[3]]
    as_dict = arch.submodel_config(cfg.to_dict(), [1])
    assert type(as_dict) is Qwen2Config and as_dict.num_hidden_layers == 1


def test_elo_submodel_build_matches_full_layers(tiny_model):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    sub, idx = arch.load_submodel(tiny_model, [0, -1])
    assert idx == [0, 3] and arch.model_num_layers(sub) == 2
    full_sd, sub_sd = full.state_dict(), sub.state_dict()
    for key, tensor in sub_sd.items():
        src = arch.rename_layer_key(key, {0: 0, 1: 3})
        assert torch.equal(tensor, full_sd[src]), key
    # same computation as the full model with its middle layers removed
    full.model.layers = torch.nn.ModuleList([full.model.layers[0], full.model.layers[3]])
    x = torch.randint(0, full.config.vocab_size, (2, 12))
    torch.testing.assert_close(sub(x, use_cache=False).logits, full(x, use_cache=False).logits)


def test_elo_submodel_never_reads_middle_layers(tiny_model, tmp_path):
    """The middle layers are deleted from the checkpoint: building must not need them."""
    folder = tmp_path / "no-middle"
    shutil.copytree(tiny_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if arch.layer_of_key(k) not in (1, 2)}
    assert len(kept) < len(weights)
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    sub, _ = arch.load_submodel(folder, [0, 3])
    assert sub(torch.tensor([[1, 5, 7]])).logits.shape[-1] == sub.config.vocab_size
    with pytest.raises(TrainingError, match=r"missing: \['model.layers.0"):
        arch.load_submodel(folder, [1, 3])


def test_train_only_layers_freezes_the_rest(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(Path(tiny_model)))
    assert arch.train_only_layers(model, [-1]) == [3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.3.") for n in trainable)

