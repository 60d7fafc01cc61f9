"""Where and how a stage's models run: the effective ``runtime:`` of one stage.

The recipe's ``runtime:`` section (:class:`engine.recipe.runtime.RuntimeSpec`) with the
stage's own overrides applied (:func:`engine.recipe.validate.effective_runtime`) becomes a
:class:`Runtime`, which the stage's :class:`~engine.run.context.StageContext` carries. A
module of its own, importing nothing of the engine, so that validation (which builds one)
and the stage cache (which fingerprints one) need not import the context and the model
loaders behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Where and how models run; from the recipe's ``runtime:`` (stage overrides win)."""

    device: str = "auto"
    dtype: str = "auto"
    load_in_8bit: bool = False
    trust_remote_code: bool = False
    #: CPU threads for torch: an int, "auto", or None (leave torch's setting alone);
    #: see :mod:`engine.run.threads`
    threads: int | str | None = "auto"
    #: attention kernel: "auto", "sdpa", "eager" or "flash_attention_2"
    attention: str = "auto"
    #: experiment trackers (accelerate) training logs go to, besides train_log.jsonl
    log_with: list[str] = field(default_factory=list)
    #: device memory in GiB that estimates are checked against (None: detected)
    memory_gb: float | None = None
    #: shard trained models across the launch's processes (FSDP2) instead of replicating them
    fsdp: bool = False
