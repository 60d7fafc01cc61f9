"""Generate docs/scaling.md from engine.recipe.estimate: ``python benchmarks/speed/scaling_doc.py > docs/scaling.md``.

Every figure in the page is computed here from Llama-3.1-8B's shape by
:mod:`engine.recipe.estimate` (memory) and :func:`flops_per_token` (the relative cost of a
step); tests/recipe/test_estimate.py checks that the page equals this output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.recipe import estimate  # noqa: E402
from engine.recipe.estimate import GiB, Shape, TrainSetup  # noqa: E402

LLAMA_8B = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
DEVICE_GIB = 80
SEQ = 2048
MICRO = 1


def flops_per_token(shape: Shape, setup: TrainSetup) -> float:
    """Matmul FLOPs of one training token: forward 2 per weight (plus attention's
    ``4 * seq * hidden`` per layer); backward 2x the forward of a trained weight (input
    and weight gradients), 1x for a frozen weight that the gradient passes through,
    nothing below the first trained layer; checkpointing adds one forward of the
    layers it rebuilds."""
    layers = setup.model_layers
    layer_fwd = 2 * (shape.layer_params - 2 * shape.hidden) + 4 * setup.seq_len * shape.hidden
    head_fwd = 2 * shape.vocab * shape.hidden
    trained = set(setup.trained_layers) if setup.lora_r is None else set()
    first = 0 if setup.train_embeddings else min(setup.trained_layers, default=layers)
    fwd = layers * layer_fwd + head_fwd
    bwd = head_fwd * (2 if setup.train_embeddings else 1)
    for i in range(first, layers):  # LoRA's own adapters: under 1% of a layer's FLOPs at r=16, left out
        bwd += layer_fwd * (2 if i in trained else 1)
    recompute = (layers - first) * layer_fwd if setup.checkpointing else 0
    return float(fwd + bwd + recompute)


@dataclass
class Row:
    what: str
    setting: str
    setup: TrainSetup


def _full(**kw) -> TrainSetup:
    base = dict(micro_batch=MICRO, seq_len=SEQ, model_layers=LLAMA_8B.layers,
                trained_layers=tuple(range(LLAMA_8B.layers)), mixed_precision=True)
    return TrainSetup(**{**base, **kw})


ENDS = (0, LLAMA_8B.layers - 1)
ROWS = [
    Row("CT, full (also SFT and elo-align's fine-tune)", "defaults: fp32 master weights, bf16 autocast, AdamW",
        _full()),
    Row("CT, full", "+ gradient_checkpointing", _full(checkpointing=True)),
    Row("CT, full", "+ gradient_checkpointing, adamw-8bit", _full(checkpointing=True, optimizer="adamw-8bit")),
    Row("CT, full", "+ gradient_checkpointing, adamw-8bit, runtime.dtype bfloat16",
        _full(checkpointing=True, optimizer="adamw-8bit", weight_bytes=2)),
    Row("CT, layers [0, -1]", "defaults", _full(trained_layers=ENDS, train_embeddings=False)),
    Row("CT, layers [0, -1], frozen_8bit", "defaults",
        _full(trained_layers=ENDS, train_embeddings=False, frozen_8bit=True)),
    Row("ELO stage 1 (elo)", "defaults: sub-model of layers 0 and 31",
        _full(model_layers=2, trained_layers=(0, 1), train_embeddings=False)),
    Row("ELO stage 1 (elo)", "train_embeddings: true", _full(model_layers=2, trained_layers=(0, 1))),
    Row("CT or SFT with LoRA r=16", "defaults (fp32 base weights)",
        _full(train_embeddings=False, lora_r=16)),
    Row("CT or SFT with LoRA r=16", "+ gradient_checkpointing, runtime.dtype bfloat16",
        _full(train_embeddings=False, lora_r=16, checkpointing=True, weight_bytes=2)),
]


def _gib(value: float) -> str:
    return f"{value / GiB:.1f}"


def training_table() -> str:
    limit = DEVICE_GIB * GiB * estimate.HEADROOM
    ct = flops_per_token(LLAMA_8B, ROWS[0].setup)
    lines = ["| stage | setting | weights | grads | optimizer | activations | logit grads | total GiB | fits | "
             "step cost vs full CT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        est = estimate.estimate_training(LLAMA_8B, row.setup)
        p = est.parts
        fits = "yes" if est.total <= limit else "no"
        lines.append(f"| {row.what} | {row.setting} | {_gib(p['weights'])} | {_gib(p['grads'])} | "
                     f"{_gib(p['optimizer'])} | {_gib(p['activations'])} | {_gib(p['logit grads'])} | "
                     f"{_gib(est.total)} | {fits} | {flops_per_token(LLAMA_8B, row.setup) / ct:.2f} |")
    return "\n".join(lines) + "\n"


def levers_table() -> str:
    limit = DEVICE_GIB * GiB * estimate.HEADROOM
    lines = ["| stage | levers that make it fit (in order) | estimate GiB |", "|---|---|---|"]
    for row in ROWS:
        if row.setting != "defaults" and not row.setting.startswith("defaults"):
            continue
        est = estimate.estimate_training(LLAMA_8B, row.setup)
        if est.total <= limit:
            lines.append(f"| {row.what} | fits as it is | {_gib(est.total)} |")
            continue
        found = estimate.fitting_levers(LLAMA_8B, row.setup, limit)
        text, total = (", ".join(found[0]), _gib(found[1])) if found else ("none on one device: FSDP", "")
        lines.append(f"| {row.what} | {text} | {total} |")
    return "\n".join(lines) + "\n"


def other_table() -> str:
    merge = estimate.estimate_merge(LLAMA_8B, 4)
    score = estimate.estimate_scoring(LLAMA_8B, batch=8, seq_len=SEQ, weight_bytes=2)
    return ("| stage | setting | peak GiB |\n|---|---|---|\n"
            f"| merge (ties, dare-ties, slack-ties, task-arithmetic, linear) | 4 models onto a base, "
            f"streamed tensor by tensor in float32 | {_gib(merge.total)} |\n"
            f"| evaluate (perplexity, task scoring) | bf16 weights, batch 8 x {SEQ} tokens | "
            f"{_gib(score.total)} (weights {_gib(score.parts['weights'])}) |\n")


def markdown() -> str:
    s = LLAMA_8B
    elo = flops_per_token(s, ROWS[6].setup) / flops_per_token(s, ROWS[0].setup)
    return f"""<!-- generated by benchmarks/speed/scaling_doc.py from engine/recipe/estimate.py; do not edit by hand -->
# Scaling to an 8B model on one GPU

What ELO, CT, SFT, LoRA and the merges need for **Llama-3.1-8B** (32 layers, hidden
4096, 32 heads, 8 kv heads, intermediate 14336, vocab 128256: {s.params:,}
parameters) on **one {DEVICE_GIB} GB GPU**, and which levers make each fit. Every figure
below is computed by `engine/recipe/estimate.py` (the same code `engine validate` warns
with) at sequence length {SEQ} and micro-batch {MICRO} (raise `grad_accum` for a larger
effective batch: it does not change the peak). A stage "fits" when its estimate is at
most {estimate.HEADROOM:.0%} of {DEVICE_GIB} GiB (the rest is left to the CUDA context,
kernels' workspaces and allocator fragmentation).

**No GPU figure exists yet.** The memory model is checked on the CPU against
autograd's saved tensors of real transformers Llama models (tests/recipe/test_estimate.py,
within 2%) and its parameter counts against real models (and 8,030,261,248 for
this shape); the bf16 activation figures are that element count at 2 bytes, not a
measurement. `benchmarks/speed/gpu_check.py` measures peak GPU memory next to this
estimate the first time it runs on a GPU (docs/benchmarks.md, "GPU check").

## Training stages

Bytes by part, in GiB. "Step cost vs full CT" is the matmul FLOPs of a training token
relative to full CT (forward 2 FLOPs per weight and backward 4 for a trained weight, 2
for a frozen one the gradient passes through, none below the first trained layer;
checkpointing adds a forward). It is a projection from the model's shape, not a
timing: on a GPU the time ratio also depends on kernel efficiency at each size.

{training_table()}
## Levers that make each fit

The smallest set of levers, tried in the order `engine validate` suggests them
(gradient checkpointing, bf16 autocast, 8-bit optimizer state, bf16 weights, a
micro-batch of 1), that brings a stage's default under the budget:

{levers_table()}
- `params.gradient_checkpointing: true` keeps one hidden state per layer instead of
  every layer's activations, for about one more forward pass per step.
- `params.optimizer: adamw-8bit` (bitsandbytes) stores AdamW's two moments in 1 byte
  each instead of 4; `paged-adamw-8bit` also pages them to host memory on CUDA.
- `runtime.dtype: bfloat16` loads trained weights in bf16, which halves weights and
  gradients but rounds small updates away (the engine's default keeps float32 master
  weights for that reason): prefer it with a learning rate that is not tiny, or use
  a layer selection, LoRA or ELO instead.
- `frozen_8bit` (ct with layers) holds the frozen layers in 8 bits.
- `lora.quantize: 4bit` (QLoRA, ct and sft) holds the frozen decoder layers in 4 bits:
  the estimate counts them at 0.516 byte a weight (0.5 + double-quantised block scales;
  0.5625 without `double_quant`, 1 byte with `8bit`), embeddings and head as loaded. For
  the 8B shape above with r 16 that is 8.0 GB of weights against 32.3 GB in float32.
- A model that fits none of these is trained with FSDP over several devices.

## ELO against CT

ELO stage 1 trains a {ROWS[6].setup.model_layers}-layer sub-model: its step costs
{elo:.2f} of a full-CT step by FLOPs, because the 30 middle layers are absent rather
than frozen (the head's {2 * s.vocab * s.hidden / 1e9:.1f} GFLOPs per token forward then
dominate). This is a FLOP projection. The only measured ratio so far is on the CPU at
tiny size: `benchmarks/speed/gpu_check.py --tiny` on an Intel(R) Xeon(R) Processor (2 cores
shared with other work, torch on one thread) gave ELO 1.8x to 2.1x full CT's tokens/s
in three runs on a 4-layer hidden-64 model, where the head and the per-step overhead
weigh far more than at 8B; it says nothing about a GPU.

## Merges and evaluation

{other_table()}
Merges stream tensor by tensor from safetensors shards and write shards as they go,
so their peak does not grow with the number of layers. The figure is an upper bound:
every input's copy of the largest tensor (the {s.vocab}x{s.hidden} embedding) plus the
base, the result and a working copy, in float32; position-wise methods (all but
dare-ties) merge large tensors in row slices of about 4M elements, so they hold less.
They run on the CPU or, with `params.device: cuda`, on the GPU. Evaluation holds the
bf16 weights and one batch's working set and logits.

## Time

No absolute time is given here: none has been measured on a GPU. A stage's time is
its tokens (`steps x batch_size x seq_len`) divided by its tokens/s, which
`benchmarks/speed/gpu_check.py` measures for CT, ELO and CT with 8-bit frozen layers on the
1B shape and on 8 of the 8B shape's layers; the step-cost column above says how the
stages should compare at 8B.

{tokenizer_section()}"""


#: a transplant onto a same-size vocabulary of which this share is new (the rest shared)
NEW_SHARE = 0.25
#: the largest safetensors shard of Llama-3.1-8B's published files, in bytes (about 5 GB)
SHARD_BYTES = 4.98e9
#: sustained float32 matrix-product rate assumed for the CPU, FLOP/s (a few cores' sgemm)
CPU_FLOPS = 1e11


def tokenizer_section() -> str:
    """Tokenizer transfer at 8B (engine extend-tokenizer / transplant-tokenizer and
    train_only): host memory and work from the shape; nothing here is a measurement."""
    s = LLAMA_8B
    rows, d = s.vocab, s.hidden
    f32 = rows * d * 4
    new = int(rows * NEW_SHARE)
    shared = rows - new
    held = 2 * f32 + 2 * f32 + 2 * rows * d * 2 + SHARD_BYTES  # old + new float32, bf16 copies, a shard
    weights = s.params * 2  # bf16 files
    omp_flops = 2 * 2 * new * shared * d  # candidates: one similarity row per new token, embedding and head
    emb = _full(trained_layers=())
    emb_est = estimate.estimate_training(s, emb)
    ct = flops_per_token(s, ROWS[0].setup)
    return f"""## Tokenizer transfer

`engine extend-tokenizer` and `engine transplant-tokenizer` run on the host (no GPU) and
hold only the vocabulary tensors whole. For Llama-3.1-8B's untied {rows}x{d} embedding
and head, given a vocabulary of the same size of which {NEW_SHARE:.0%} is new ({new:,}
rows made, {shared:,} shared):

| part | host memory GiB |
|---|---|
| old embedding and head, float32 | {2 * f32 / GiB:.1f} |
| new embedding and head, float32 | {2 * f32 / GiB:.1f} |
| their bf16 copies while written | {2 * rows * d * 2 / GiB:.1f} |
| one shard passing through (about 5 GB) | {SHARD_BYTES / GiB:.1f} |
| **peak** | **{held / GiB:.1f}** |

Every shard is read and written once: {weights / 1e9:.0f} GB each way in bf16, about
{2 * weights / 1e9 / 1.0:.0f} s at 1 GB/s of disk. The init methods add:

- `mean`, `random`: one gather or draw per new row, {new * d * 3 / 1e9:.1f} GFLOP: seconds;
- `omp` in a donor's space: one similarity row per new token against the {shared:,} shared
  rows, for the embedding and the head: {omp_flops / 1e12:.0f} TFLOP of float32 matrix
  products (in blocks of 1,024 tokens), about {omp_flops / CPU_FLOPS / 60:.0f} minutes at
  {CPU_FLOPS / 1e9:.0f} GFLOP/s, plus matching pursuit over each token's 64 candidates, worked a block
  of tokens per numpy call in the candidates' Gram space (blocks kept near 128 MB: 64
  tokens at dimension 4096), under a minute. The donor's embedding and head (float32) and copies of its
  shared rows (plain and normalised) add {(2 * f32 + 2 * shared * d * 4) / GiB:.1f} GiB to the peak;
- `focus` and `omp` in the auxiliary space: fastText on the target text, linear in its
  tokens and `epochs` (one worker), then one similarity row per new token against the old
  tokens seen in that text (dimension 100: seconds). On the built-in world the whole
  command's time is measured in [benchmarks](benchmarks.md#vocabulary-transfer).

Training the new rows (`ct` with `train_only: embeddings` or `new-rows`) keeps the whole
model's forward and backward pass (the gradient reaches the input embedding through every
layer) but trains and keeps AdamW state for the embedding and head only (`new-rows` masks
the gradient of the other rows; the optimizer state is still the whole tensors'):

| stage | weights | grads | optimizer | activations | logit grads | total GiB | step cost vs full CT |
|---|---|---|---|---|---|---|---|
| CT, train_only: embeddings or new-rows | {_gib(emb_est.parts['weights'])} | {_gib(emb_est.parts['grads'])} | {_gib(emb_est.parts['optimizer'])} | {_gib(emb_est.parts['activations'])} | {_gib(emb_est.parts['logit grads'])} | {_gib(emb_est.total)} | {flops_per_token(s, emb) / ct:.2f} |
"""


if __name__ == "__main__":
    sys.stdout.write(markdown())
