"""Model merging: streaming tensor I/O, pre-flight checks, and merge arithmetic.

The public helpers a merge plugin uses (built-in or third-party):

* :mod:`engine.merging.arithmetic` -- pure functions on tensors (linear, task
  arithmetic, TIES, DARE-TIES, slack-TIES and their building blocks);
* :mod:`engine.merging.params` -- shared ``Params`` declarations and per-model
  parameter resolution;
* :mod:`engine.merging.execute` -- :func:`run_merge`, which streams a merge tensor by
  tensor into a stage's output folder;
* :mod:`engine.merging.preflight` -- header-only input checks;
* :mod:`engine.merging.lora` -- PEFT LoRA adapter folders as merge inputs (the delta
  ``scaling · B·A`` on the base);
* :mod:`engine.merging.tensorio` -- safetensors readers and the streaming shard writer.

The arithmetic convention (mergekit's) and every formula are in docs/merging.md.
"""

from engine.merging.arithmetic import (
    MagnitudeThreshold,
    SlackTiesResult,
    dare_ties,
    dare_ties_delta,
    linear,
    magnitude_trim,
    random_drop,
    slack_ties,
    slack_ties_combine,
    slack_ties_delta,
    stack_deltas,
    task_arithmetic,
    task_arithmetic_delta,
    ties,
    ties_combine,
    ties_delta,
)
from engine.merging.execute import (
    MergeSummary,
    Positionwise,
    PositionwiseMerge,
    TensorMerge,
    merge_folders,
    run_merge,
)
from engine.merging.lora import LoraAdapter, is_adapter_folder, read_adapter
from engine.merging.overrides import TensorOverride, for_tensor, per_tensor
from engine.merging.params import (
    MergeParams,
    PerModelDensity,
    PerModelFloat,
    TaskVectorParams,
    TiesParams,
    check_static,
    check_weight_sum,
    resolve_per_model,
)
from engine.merging.preflight import MergePlan, check_configs, check_merge_inputs

__all__ = [
    "LoraAdapter", "MagnitudeThreshold", "MergeParams", "MergePlan", "MergeSummary", "PerModelDensity",
    "PerModelFloat", "Positionwise", "PositionwiseMerge", "SlackTiesResult", "TaskVectorParams",
    "TensorMerge", "TensorOverride", "TiesParams", "check_configs", "check_merge_inputs",
    "check_static", "check_weight_sum", "dare_ties", "dare_ties_delta", "for_tensor",
    "is_adapter_folder", "linear",
    "magnitude_trim", "merge_folders", "per_tensor", "random_drop", "read_adapter",
    "resolve_per_model",
    "run_merge", "slack_ties", "slack_ties_combine", "slack_ties_delta", "stack_deltas",
    "task_arithmetic", "task_arithmetic_delta", "ties", "ties_combine", "ties_delta",
]
