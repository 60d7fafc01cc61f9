"""Model merging: streaming tensor I/O, pre-flight checks, and merge arithmetic.

The public helpers a merge plugin uses (built-in or third-party):

* :mod:`engine.merging.arithmetic` -- pure functions on tensors (linear, task
  arithmetic, TIES, DARE-TIES, slack-TIES and their building blocks);
* :mod:`engine.merging.params` -- shared ``Params`` declarations and per-model
  parameter resolution;
* :mod:`engine.merging.method` -- :class:`MergeMethod`, the base class of a merge
  method: it declares ``name`` and ``Params`` and writes the arithmetic on one tensor;
  the engine resolves and checks every param, trims and streams;
* :mod:`engine.merging.declared` -- the markers a ``Params`` field carries: per model, the
  range its validator accepts, a declared search range (``SearchRange``, for a number any
  value of which is valid) that a merge ``search:`` samples;
* :mod:`engine.merging.counts` -- how many models a method merges (``min_models``,
  ``max_models``) and the refusal of other counts;
* :mod:`engine.merging.gradients` -- layer gradients: a param written as a list of
  numbers, interpolated across the decoder layers (mergekit's convention);
* :mod:`engine.merging.trims` -- magnitude trims: top-``density`` and magnitude bands,
  exact whole or in row slices;
* :mod:`engine.merging.execute` -- the streaming loop; :func:`run_merge`, the older
  entry point for a plugin's own merge function (deprecated);
* :mod:`engine.merging.preflight` -- header-only input checks;
* :mod:`engine.merging.passthrough` -- layer stacking: a model made of layer ranges of
  other models (a different number of layers), streamed tensor by tensor;
* :mod:`engine.merging.lora` -- PEFT LoRA adapter folders as merge inputs (the delta
  ``scaling · B·A`` on the base);
* :mod:`engine.models.tensorio` -- safetensors readers and the streaming shard writer.

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
    seed_for,
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
from engine.merging.declared import Bounds, SearchRange
from engine.merging.execute import (
    MergeSummary,
    Positionwise,
    PositionwiseMerge,
    TensorMerge,
    merge_folders,
    run_merge,
)
from engine.merging.gradients import Gradient, layer_index, layer_position, value_at
from engine.merging.inputs import MergePlan
from engine.merging.lora import LoraAdapter, is_adapter_folder, read_adapter
from engine.merging.method import MergeMethod, ResolvedParams, TensorSlice
from engine.merging.overrides import TensorOverride, for_tensor, per_tensor
from engine.merging.params import (
    ExecutionParams,
    Layered,
    MergeParams,
    PerModel,
    PerModelDensity,
    PerModelFloat,
    TaskVectorParams,
    TiesParams,
    check_weight_sum,
    layered_range,
    per_model_range,
    resolve_per_model,
)
from engine.merging.passthrough import StackPlan, plan_layer_stack, run_layer_stack, stack_layers
from engine.merging.preflight import check_configs, check_merge_inputs, check_static
from engine.merging.trims import BandSelector, MagnitudeBand, magnitude_band

__all__ = [
    "BandSelector", "Bounds", "SearchRange", "ExecutionParams", "Gradient", "Layered", "MagnitudeBand", "MergeMethod", "PerModel",
    "ResolvedParams", "TensorSlice", "magnitude_band",
    "LoraAdapter", "MagnitudeThreshold", "MergeParams", "MergePlan", "MergeSummary", "PerModelDensity",
    "PerModelFloat", "Positionwise", "PositionwiseMerge", "SlackTiesResult", "StackPlan", "TaskVectorParams",
    "TensorMerge", "TensorOverride", "TiesParams", "check_configs", "check_merge_inputs",
    "check_static", "check_weight_sum", "dare_ties", "dare_ties_delta", "for_tensor",
    "is_adapter_folder", "layer_index", "layer_position", "layered_range", "linear",
    "magnitude_trim", "merge_folders", "per_model_range", "per_tensor", "plan_layer_stack", "random_drop", "read_adapter",
    "resolve_per_model",
    "run_layer_stack", "run_merge", "seed_for", "slack_ties", "slack_ties_combine", "slack_ties_delta", "stack_deltas",
    "stack_layers", "task_arithmetic", "task_arithmetic_delta", "ties", "ties_combine",
    "ties_delta", "value_at",
]
