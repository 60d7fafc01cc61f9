"""Tiny models, tokenizers, data files and stage contexts, built in-process.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences and a
randomly initialised 4-layer, hidden-32 Llama is saved as an ordinary Hugging Face
folder (safetensors + tokenizer), a few hundred kilobytes. A *family* is a base and
models of the same shape with different weights (three by default): what a merge takes.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.run.context import StageContext
from engine.run.runtime import Runtime

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "FAMILY_NAMES", "TINY_TEXT", "build_family", "build_tiny_llama", "build_tokenizer",
    "family_names", "make_stage_context", "shared_family", "write_choice_file",
    "write_instructions_file", "write_text_file",
]

#: the sentences the tiny tokenizer is trained on and the default text data
TINY_TEXT = [
    "the cat sits on the mat and the dog runs in the park",
    "a small model learns words from a small corpus of text",
    "lum vela dora sen kato lumi vel ados kira nen",
    "question what color is the sky answer blue",
] * 4

#: the models of :func:`build_family`, in order; each is seeded by its position
FAMILY_NAMES = ("base", "a", "b", "c")


def family_names(models: int = 3) -> tuple[str, ...]:
    """``("base", "a", "b", ...)`` with ``models`` models after the base (at most 26)."""
    if not 1 <= models <= 26:
        raise ValueError(f"a family has 1 to 26 models besides the base, not {models}")
    return ("base", *(chr(ord("a") + i) for i in range(models)))


def build_tokenizer(out_dir: Path, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (vocabulary about 320, tokens ``<pad>``, ``<s>``
    (bos), ``</s>`` (eos)) trained on ``texts`` (default :data:`TINY_TEXT`), saved to
    ``out_dir`` and returned as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts or TINY_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(out_dir: Path, *, num_layers: int = 4, hidden: int = 32, seed: int = 0,
                     tokenizer: PreTrainedTokenizerFast | None = None,
                     vocab_size: int | None = None, tied: bool = False) -> Path:
    """A Llama initialised from ``torch.manual_seed(seed)``, saved to ``out_dir`` (returned)
    as a Hugging Face folder (config.json, model.safetensors, tokenizer files): ``num_layers``
    decoder layers, hidden size ``hidden`` (MLP ``2 * hidden``, 4 heads, 2 key/value heads),
    untied embeddings (``tied``: the head tied to the input embedding). ``tokenizer`` defaults to a new :func:`build_tokenizer` in
    ``out_dir``; ``vocab_size`` to the tokenizer's length."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return out_dir


def build_family(root: Path, tokenizer: PreTrainedTokenizerFast | None = None,
                 names: tuple[str, ...] = FAMILY_NAMES, **model_kwargs: Any) -> dict[str, Path]:
    """A base and models of the same shape with different weights (merge inputs):
    ``{name: root/name}`` in ``names`` order, the i-th built by :func:`build_tiny_llama`
    with seed i (``model_kwargs`` passed on), all sharing one tokenizer (default: a new
    one in ``root/tokenizer``). Five models: ``names=family_names(5)``."""
    root = Path(root)
    tok = tokenizer if tokenizer is not None else build_tokenizer(root / "tokenizer")
    return {name: build_tiny_llama(root / name, tokenizer=tok, seed=seed, **model_kwargs)
            for seed, name in enumerate(names)}


_SHARED: dict[str, Any] = {}


def shared_family(models: int = 3) -> dict[str, Path]:
    """``base`` and ``models`` models (``a``, ``b``, ...) of one :func:`build_family` per
    process, in a temporary folder removed at exit: what the conformance checks use when
    not handed a family. Models are added as more are asked for; each keeps its seed (its
    position), so ``a`` is the same folder whatever the count. Treat it as read-only."""
    names = family_names(models)
    if "root" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="lingoforge-family-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED.update(root=root, tokenizer=build_tokenizer(root / "tokenizer"), family={})
    family: dict[str, Path] = _SHARED["family"]
    for seed, name in enumerate(names):
        if name not in family:
            family[name] = build_tiny_llama(_SHARED["root"] / name, tokenizer=_SHARED["tokenizer"],
                                            seed=seed)
    return {name: family[name] for name in names}


def write_text_file(path: Path, lines: list[str] | None = None) -> Path:
    """A ``text`` data file: one document per line."""
    path = Path(path)
    path.write_text("\n".join(lines or TINY_TEXT) + "\n")
    return path


def write_instructions_file(path: Path, n: int = 12) -> Path:
    """An ``instructions`` data file: jsonl with ``prompt`` and ``response``."""
    path = Path(path)
    rows = [{"prompt": f"question what is {i} plus one answer", "response": f" {i + 1}"}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_choice_file(path: Path) -> Path:
    """A ``choice`` data file: multiple-choice items with ``prompt``, ``choices``, ``label``."""
    path = Path(path)
    rows = [{"prompt": "question what color is the sky answer", "choices": [" blue", " cat", " mat"],
             "label": 0},
            {"prompt": "the cat sits on the", "choices": [" mat", " sky"], "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_stage_context(workdir: Path, stage_name: str = "stage", stage_kind: str = "adapt-language",
                       plugin: str = "test", *, console: Any = None, **runtime: Any) -> StageContext:
    """A :class:`StageContext` writing into ``<workdir>/out-<stage_name>`` (created), on the
    CPU unless ``runtime`` says otherwise: run an implementation without the runner.
    ``console`` (a rich Console) receives the stage's log lines (default: stderr)."""
    workdir = Path(workdir)
    out = workdir / f"out-{stage_name}"
    out.mkdir(parents=True, exist_ok=True)
    runtime.setdefault("device", "cpu")
    return StageContext(run_name="test", stage_name=stage_name, stage_kind=stage_kind,
                        plugin=plugin, workdir=workdir, output_dir=out, runtime=Runtime(**runtime),
                        console=console)
