"""Model folders and what is in them: loading and saving them safely, their weights read
one tensor at a time, LoRA adapter folders, decoder-layer surgery and what a loaded model
can do.

* :mod:`engine.models.layout` -- where a folder keeps its weights, safetensors headers,
  what marks an adapter folder;
* :mod:`engine.models.safety` -- what is refused before any weight or code is touched;
* :mod:`engine.models.tensorio` -- streaming safetensors reads and the sharded writer;
* :mod:`engine.models.adapters` -- PEFT LoRA adapter folders: layout, base, arithmetic;
* :mod:`engine.models.modelio` -- loading and saving Hugging Face folders;
* :mod:`engine.models.arch` -- decoder layers, embeddings and head; ELO sub-models;
* :mod:`engine.models.attention`, :mod:`engine.models.quantization`,
  :mod:`engine.models.capabilities`, :mod:`engine.models.slow_paths` -- the attention
  kernel, 4/8-bit loading, what a loaded model supports (probed), and the slower paths;
* :mod:`engine.models.card` -- the README.md model card of a stage's output.

:mod:`engine.models.tokenizer` (a tokenizer's coverage of a language, and extending it)
sits a layer higher (it reads recipes and data); this package does not import it.
"""

from engine.models.arch import (
    LayerIndexError,
    decoder_layers,
    embeddings,
    layer_of_key,
    lm_head,
    load_submodel,
    num_layers,
    resolve_indices,
)
from engine.models.layout import TensorInfo, is_adapter_folder, read_header, weight_files
from engine.models.modelio import (
    check_model_folder,
    load_model,
    load_tokenizer,
    read_config,
    resolve_device,
    resolve_dtype,
    save_model,
    save_updated_copy,
)
from engine.models.tensorio import ModelReader, ShardedWriter, read_tensor_infos

__all__ = [
    "LayerIndexError", "ModelReader", "ShardedWriter", "TensorInfo", "check_model_folder",
    "decoder_layers", "embeddings", "is_adapter_folder", "layer_of_key", "lm_head", "load_model",
    "load_submodel", "load_tokenizer", "num_layers", "read_config", "read_header",
    "read_tensor_infos", "resolve_device", "resolve_dtype", "resolve_indices", "save_model",
    "save_updated_copy", "weight_files",
]
