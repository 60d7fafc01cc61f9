"""Model folders and decoder-layer surgery: read configs and metadata without loading
weights, find a model's decoder layers, embeddings and head, detach layers into a
sub-model and put them back."""

from engine.models.arch import (
    LayerIndexError,
    check_int8_split,
    check_supported,
    choose_layers,
    decoder_layers,
    embeddings,
    layer_module_names,
    layer_of_key,
    lm_head,
    load_submodel,
    model_num_layers,
    num_layers,
    rename_layer_key,
    resolve_indices,
    train_only_layers,
)
from engine.models.layout import weight_files
from engine.models.modelio import (
    META_FILE,
    is_adapter_folder,
    read_config,
    read_meta,
    save_updated_copy,
)

__all__ = [
    "META_FILE", "LayerIndexError", "check_int8_split", "check_supported", "choose_layers",
    "decoder_layers", "embeddings", "is_adapter_folder", "layer_module_names", "layer_of_key",
    "lm_head", "load_submodel", "model_num_layers", "num_layers", "read_config", "read_meta",
    "rename_layer_key", "resolve_indices", "save_updated_copy", "train_only_layers",
    "weight_files",
]
