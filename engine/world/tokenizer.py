"""The tiny world's tokenizer: a byte-level BPE trained on the base model's text.

It is trained on the pretraining mixture (English, Vel and Dor train text plus the
small Lum sample), so Lum words split into more pieces than the others, as a
low-resource language's words do in a real multilingual tokenizer.

Two more special tokens, ``<|user|>`` and ``<|assistant|>``, mark the turns of the
chat template (:data:`CHAT_TEMPLATE`). No raw text contains them: the base model has
never seen them (their embeddings stay at initialisation, as a real base model's chat
tokens do), so the instruction format is something only instruction tuning teaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB_SIZE = 1536
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>")

#: one turn per message, no system turn; the assistant's text ends with EOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant turns are supported') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>`` as bos/eos/pad and
    the chat template.

    Texts are fed in the given (fixed) order; the result is checked to be
    deterministic by the tests (tokenizer.json byte-identical across processes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512,
                                   additional_special_tokens=list(SPECIAL_TOKENS[3:]))
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, expected {vocab_size}: "
                           "the corpus is too small for the vocabulary size")
    return fast


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))
