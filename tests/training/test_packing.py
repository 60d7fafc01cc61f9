"""Packing documents without attention across them: position ids, labels, the probe,
the fallback, and a document's loss packed or alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from engine.core.errors import DataError, TrainingError
from engine.core.inputs import DataSource
from engine.models.capabilities import packing_probe
from engine.training.batching import pack, training_batches
from engine.training.examples import IGNORE_INDEX, collate, tokenized_examples
from engine.training.loop import TrainerParams, train
from engine.training.packing import document_batch, pack_documents, packed_example_batches

IGNORE = IGNORE_INDEX


def _load(path, impl: str = "sdpa") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


def test_positions_restart_at_documents_and_blocks_and_labels_mask_boundaries():
    docs = [[10, 11, 12], [20, 21, 22, 23, 24], [30]]
    blocks = list(pack_documents(docs, 4))
    assert [ids for ids, _ in blocks] == list(pack(docs, 4))  # same stream, same cuts
    assert blocks == [([10, 11, 12, 20], [0, 1, 2, 0]), ([21, 22, 23, 24], [0, 1, 2, 3])]
    batch = document_batch(blocks)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention mask, no padding
    # 20 would be predicted from the end of the previous document: not a target
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, IGNORE], [IGNORE, 22, 23, 24]]


def test_a_document_longer_than_seq_len_is_cut_into_blocks_each_counting_from_zero():
    blocks = list(pack_documents([list(range(100, 110)), [7, 8]], 4))
    assert [ids for ids, _ in blocks] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 7, 8]]
    assert [pos for _, pos in blocks] == [[0, 1, 2, 3]] * 2 + [[0, 1, 0, 1]]


def _doc_loss(model, ids, position_ids, labels) -> float:
    with torch.no_grad():
        kwargs = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
        return float(model(input_ids=ids, labels=labels, **kwargs).loss)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_documents_loss_is_the_same_packed_or_alone(tiny_model, impl):
    model = _load(tiny_model, impl)
    docs = [[5, 9, 14, 3, 8, 21, 2], [7, 30, 11, 2], [40, 41, 42, 43, 44, 2]]
    (ids, pos), = pack_documents(docs, sum(map(len, docs)))
    batch = document_batch([(ids, pos)])
    start, worst, stream_gap = 0, 0.0, 0.0
    for doc in docs:
        alone = torch.tensor([doc])
        want = _doc_loss(model, alone, None, alone)
        labels = torch.full_like(batch["labels"], IGNORE)
        labels[0, start + 1:start + len(doc)] = batch["labels"][0, start + 1:start + len(doc)]
        got = _doc_loss(model, batch["input_ids"], batch["position_ids"], labels)
        worst = max(worst, abs(got - want))
        stream_gap = max(stream_gap, abs(_doc_loss(model, batch["input_ids"], None, labels) - want))
        start += len(doc)
    assert worst < 1e-5
    assert stream_gap > 1e-3  # without the reset position ids the later documents see the earlier ones


def test_sft_loss_is_the_same_packed_or_padded(tiny_model, tiny_tokenizer, instructions_file):
    model = _load(tiny_model)
    examples = list(itertools.islice(tokenized_examples(tiny_tokenizer, DataSource(instructions_file, "instructions"),
                                               64), 5))
    padded = collate(examples, tiny_tokenizer.pad_token_id)
    width = sum(len(x) for x, _ in examples)  # one row holding all five
    packed = next(packed_example_batches(itertools.cycle(examples), seq_len=width, batch_size=1,
                                         pad_id=tiny_tokenizer.pad_token_id))
    assert packed["input_ids"].shape == (1, width)
    assert int((packed["labels"] != IGNORE).sum()) == int((padded["labels"] != IGNORE).sum())
    with torch.no_grad():
        want = float(model(**padded).loss)
        got = float(model(**packed, use_cache=False).loss)
    assert abs(got - want) < 1e-5


def test_packed_sft_rows_hold_whole_examples_and_pad_the_rest(tiny_tokenizer, instructions_file):
    examples = list(itertools.islice(tokenized_examples(tiny_tokenizer, DataSource(instructions_file, "instructions"),
                                               64), 3))
    lens = [len(x) for x, _ in examples]
    seq_len = lens[0] + lens[1] + 1  # the third does not fit after the first two
    batch = next(packed_example_batches(iter(examples), seq_len=seq_len, batch_size=1, pad_id=0))
    assert batch["input_ids"][0].tolist() == examples[0][0] + examples[1][0] + [0]
    assert batch["position_ids"][0].tolist() == [*range(lens[0]), *range(lens[1]), 0]
    assert batch["labels"][0, -1] == IGNORE


# --- the probe and the fallback -----------------------------------------------------------------


def _causal_only(module, query, key, value, attention_mask, **kwargs):
    """Attention that ignores any mask and attends causally over the whole row."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


@pytest.fixture
def causal_only_model(tiny_model):
    AttentionInterface.register("causal_only", _causal_only)
    AttentionMaskInterface.register("causal_only", sdpa_mask)
    yield _load(tiny_model, "causal_only")


def test_the_probe_finds_which_attention_keeps_documents_apart(tiny_model, causal_only_model):
    assert packing_probe(_load(tiny_model, "sdpa")) == "rows"
    assert packing_probe(_load(tiny_model, "eager")) == "rows"
    assert packing_probe(causal_only_model) is None


def test_auto_falls_back_to_stream_packing_and_says_so(causal_only_model, tiny_tokenizer, text_file,
                                                       make_context):
    context = make_context()
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2)
    assert batches.settle(causal_only_model, context) is False
    batch = next(batches)
    assert "position_ids" not in batch and batch["attention_mask"].all()
    assert "does not keep documents packed" in context.stats.notes["slow_paths"]["packing: LlamaForCausalLM"]
    assert context.stats.notes["packing"] == "stream"


def test_packing_documents_is_an_error_when_the_model_cannot_keep_them_apart(
        causal_only_model, tiny_tokenizer, instructions_file, make_context):
    batches = training_batches(tiny_tokenizer, [DataSource(instructions_file, "instructions")], seq_len=64,
                               batch_size=2, packing="documents")
    with pytest.raises(TrainingError, match="packing 'documents'.*causal_only"):
        batches.settle(causal_only_model, make_context())


def test_a_packing_value_of_the_other_format_is_refused(tiny_tokenizer, text_file, instructions_file):
    with pytest.raises(DataError, match="packing 'padded' does not apply to text"):
        training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2, packing="padded")
    with pytest.raises(DataError, match="packing 'stream' does not apply to instructions"):
        training_batches(tiny_tokenizer, [DataSource(instructions_file, "instructions")], seq_len=64,
                         batch_size=2, packing="stream")


def test_training_packs_documents_by_default_and_counts_every_token(tiny_model, tiny_tokenizer, text_file,
                                                                    make_context):
    context = make_context()
    params = TrainerParams(steps=3, lr=1e-3, batch_size=2, seq_len=16, log_every=1, checkpoint_every=0)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2)
    result = train(context, _load(tiny_model).train(), batches, params)
    assert context.stats.notes["packing"] == "documents"
    assert "slow_paths" not in context.stats.notes or not any(
        k.startswith("packing") for k in context.stats.notes["slow_paths"])
    assert result.state.tokens == 3 * 2 * 16  # no padding, no attention mask to count from
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_batches_drawn_packed_are_refused_to_a_model_that_cannot_keep_documents_apart(
        tiny_model, causal_only_model, tiny_tokenizer, text_file):
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2)
    assert batches.settle(_load(tiny_model)) is True
    next(batches)
    assert batches.settle(_load(tiny_model)) is True  # a second train() on the same stream
    with pytest.raises(TrainingError, match="already drawn document-packed"):
        batches.settle(causal_only_model)
