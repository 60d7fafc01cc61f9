"""Model folders and decoder-layer surgery: read configs and metadata without loading
weights, find a model's decoder layers, embeddings and head, detach layers into a
sub-model and put them back. And what an init method of new vocabulary rows (the hook
``register_embedding_inits``) is given, returns and may use: :class:`InitProblem`,
:class:`InitRows`, the auxiliary fastText space and the sparse weightings."""

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
from engine.models.tokenizer.auxiliary import (
    AUX_EXTRA,
    AUX_REQUIRES,
    AuxParams,
    AuxSpace,
    aux_atoms,
    aux_vector,
    train_aux,
)
from engine.models.tokenizer.extend import extend_tokenizer
from engine.models.tokenizer.inits import InitProblem, InitRows, NewToken, piece_mean, random_rows
from engine.models.tokenizer.sparse import omp, omp_batch, sparsemax
from engine.models.tokenizer.transplant import transplant_tokenizer

__all__ = [
    "AUX_EXTRA", "AUX_REQUIRES", "AuxParams", "AuxSpace", "InitProblem", "InitRows", "NewToken",
    "aux_atoms", "aux_vector", "extend_tokenizer", "omp", "omp_batch", "piece_mean", "random_rows", "sparsemax",
    "train_aux", "transplant_tokenizer",
    "META_FILE", "LayerIndexError", "check_int8_split", "check_supported", "choose_layers",
    "decoder_layers", "embeddings", "is_adapter_folder", "layer_module_names", "layer_of_key",
    "lm_head", "load_submodel", "model_num_layers", "num_layers", "read_config", "read_meta",
    "rename_layer_key", "resolve_indices", "save_updated_copy", "train_only_layers",
    "weight_files",
]
