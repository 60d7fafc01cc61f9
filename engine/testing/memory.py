"""Activation memory as autograd sees it: the bytes a forward pass hands autograd to keep.

One measure shared by the estimate's tests (:mod:`engine.recipe.estimate` is checked against
it) and the checkpointing benchmark, so both count the same thing.
"""

from __future__ import annotations

from typing import Any


def saved_activation_bytes(model: Any, **inputs: Any) -> tuple[int, Any]:
    """(bytes, output) of ``model(**inputs)``: the distinct non-parameter storages autograd
    saves for the backward pass (each storage counted once, at its size; the weights,
    which autograd saves too, are not counted). The output is returned so that a caller
    can run the backward pass."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    return sum(seen.values()), out
