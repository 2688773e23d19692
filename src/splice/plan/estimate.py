"""How much memory a training run takes, from the model's shape alone (no model is built).

`plan_memory(shape, method, ...)` returns a `MemoryPlan`: the bytes of the frozen weights, the
trainable weights, their gradients, the optimizer state and the activations, and the peak total,
for full fine-tuning, LoRA, or QLoRA (LoRA on an NF4 base). `plan_all_methods` gives the three
side by side. Everything is plain integers in plain dataclasses (`dataclasses.asdict` works).

# Note: What the planner counts
Weights. dtype 'fp32' keeps everything in fp32; 'bf16' keeps weights, gradients and
activations in bf16 and, as mixed-precision training does, an fp32 master copy of every
trainable parameter, counted in the optimizer state. QLoRA's frozen linear layers (every block
projection; embeddings, norms and the output head stay in dtype) take exactly the bytes
splice.quant stores: ceil(n/2) code bytes, one uint8 absmax per 64-element block, one fp32
scale per 256 blocks and one fp32 offset: 4.127 bits per parameter (4.5 without double
quantization). LoRA trains A (r × in) and B (out × r) per target: r·(in + out) parameters,
in the base's dtype.

Optimizer state, per trainable parameter: 'adamw' two fp32 moments, 8 bytes; 'adamw8bit'
(splice.optim.AdamW8bit) one byte per moment plus an fp32 scale per 256 elements, 2.03 bytes,
for tensors of 4096 elements or more (smaller ones keep 8 bytes); 'paged_adamw' the same 8
bytes as adamw but in host memory, reported as `host_optimizer_state` and not in `total`: the
device holds one tensor's moments at a time while it is updated. Plus 4 bytes of master
weights under bf16 (host memory too, when paged).

Activations: see Note: Activations of a llama block.

The total is the peak, not the sum of the parts: gradients are made while activations are
freed, so they peak at different moments. Backward frees one block's activations as it makes
that block's gradients, so the sum of the two falls or rises linearly and is largest at an end:
at the start of backward (every activation, plus the gradients the fused loss already made) or
at the optimizer step (every gradient, plus the step's temporaries). `total` is the larger of
the two and `peak_phase` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splice.config.base import ConfigError, doc, parse_targets
from splice.core.targets import matches_name
from splice.plan.shapes import ModelShape, ModuleShape

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw")   # `splice train --optimizer` names
OPTIMIZER_ALIASES = {"paged": "paged_adamw", "adamw_8bit": "adamw8bit"}
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FP32 = 4
EIGHT_BIT_MIN = 4096          # AdamW8bit's min_8bit_size
EIGHT_BIT_BLOCK = 256         # AdamW8bit's block_size (one fp32 absmax each)
EIGHT_BIT_CHUNK = 1 << 20     # AdamW8bit decodes this many elements at a time
NF4_GROUP = 256               # blocks per fp32 scale under double quantization


@dataclass(frozen=True)
class PlanSettings:
    """One training setup to plan for."""

    method: str = doc("What trains: 'full' (every weight), 'lora', or 'qlora' (LoRA on an NF4 "
                      "base).", default="lora")
    rank: int = doc("LoRA rank r.", default=16)
    targets: str = doc("Modules LoRA adapts: 'all-linear', a comma list of names (q_proj,v_proj) "
                       "or a regex over module paths.", default="all-linear")
    batch: int = doc("Sequences per micro-batch.", default=1)
    seq: int = doc("Tokens per sequence.", default=512)
    optimizer: str = doc("'adamw', 'adamw8bit' or 'paged_adamw' ('paged').", default="adamw")
    grad_checkpointing: bool = doc("Keep only each block's input; recompute the rest in backward.",
                                   default=False)
    dtype: str = doc("'bf16' (mixed precision, fp32 master weights) or 'fp32'.", default="bf16")
    loss_chunk: int = doc("Tokens per chunk of the fused output-head loss.", default=256)
    quant_block_size: int = doc("qlora: weights per NF4 block.", default=64)
    double_quant: bool = doc("qlora: 8-bit block scales (4.127 instead of 4.5 bits/weight).",
                             default=True)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        optimizer = OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: choose one of "
                              f"{', '.join(OPTIMIZERS)} (or 'paged')")
        object.__setattr__(self, "optimizer", optimizer)
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        for name in ("rank", "batch", "seq", "loss_chunk", "quant_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: give a positive integer")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ConfigError("--targets is empty: give 'all-linear', module names "
                              "(q_proj,v_proj) or a regex")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one training step needs on the device. See Note: What the planner counts."""

    settings: PlanSettings
    model: str
    params: int                   # the model's parameters
    trainable_params: int
    frozen_weights: int           # bytes of the weights that do not train (NF4 under qlora)
    trainable_weights: int
    gradients: int
    optimizer_state: int          # on the device (moments, 8-bit scales, master weights)
    activations: int              # at their peak: kept for backward, plus the loss's buffers
    total: int                    # the peak: max of the two phases (not the sum of the parts)
    peak_phase: str               # 'backward' or 'optimizer step'
    host_optimizer_state: int = 0  # paged_adamw: state in host memory, not in total

    @property
    def sum_of_parts(self) -> int:
        return (self.frozen_weights + self.trainable_weights + self.gradients
                + self.optimizer_state + self.activations)


def plan_memory(shape: ModelShape, method: str = "lora", *, rank: int = 16,
                targets: str = "all-linear", batch: int = 1, seq: int = 512,
                optimizer: str = "adamw", grad_checkpointing: bool = False, dtype: str = "bf16",
                loss_chunk: int = 256, quant_block_size: int = 64,
                double_quant: bool = True) -> MemoryPlan:
    """The memory plan of one method on `shape` (see PlanSettings for each argument)."""
    settings = PlanSettings(method, rank, targets, batch, seq, optimizer, grad_checkpointing, dtype,
                            loss_chunk, quant_block_size, double_quant)
    return plan_settings(shape, settings)


def plan_all_methods(shape: ModelShape, **kwargs) -> tuple[MemoryPlan, ...]:
    """Full fine-tuning, LoRA and QLoRA on `shape` with the same settings, in that order."""
    return tuple(plan_memory(shape, method, **kwargs) for method in METHODS)


def plan_settings(shape: ModelShape, s: PlanSettings) -> MemoryPlan:
    e = DTYPE_BYTES[s.dtype]
    tensors = trainable_tensors(shape, s)
    trainable = sum(tensors)
    device_state, host_state = optimizer_bytes(tensors, s)
    weights = trainable * e
    frozen = frozen_weight_bytes(shape, s)
    acts = activation_bytes(shape, s)
    # The fused loss makes the head's gradient in the forward pass (fp32 until backward).
    early_grads = shape.vocab * shape.hidden * FP32 if s.method == "full" else 0
    backward = frozen + weights + device_state + acts + early_grads
    step = frozen + weights + device_state + trainable * e + step_transient(shape, tensors, s)
    return MemoryPlan(settings=s, model=shape.name, params=shape.params, trainable_params=trainable,
                      frozen_weights=frozen, trainable_weights=weights, gradients=trainable * e,
                      optimizer_state=device_state, activations=acts, total=max(backward, step),
                      peak_phase="backward" if backward >= step else "optimizer step",
                      host_optimizer_state=host_state)


# --- parameters --------------------------------------------------------------------------


def lora_targets(shape: ModelShape, targets: str) -> tuple[ModuleShape, ...]:
    """The modules a LoRA `targets` value selects, by splice's rules ('all-linear' is every
    block projection, not the head; names match a path's tail; a regex the whole path)."""
    spec = parse_targets(targets)
    picked = tuple(m for m in shape.modules()
                   if (m.kind == "linear" if spec == "all-linear" else matches_name(spec, m.path)))
    if not picked:
        names = ", ".join(n for n, _, _ in shape.block_linears())
        raise ConfigError(f"--targets {targets!r} selects no module of a llama-style model; use "
                          f"'all-linear' or names from {names}, embed_tokens, lm_head")
    return picked


def lora_parameters(shape: ModelShape, rank: int, targets: str = "all-linear") -> int:
    """Parameters LoRA trains: r·(in + out) per selected module."""
    return sum(rank * (m.in_features + m.out_features) for m in lora_targets(shape, targets))


def trainable_tensors(shape: ModelShape, s: PlanSettings) -> list[int]:
    """Element counts of the trainable tensors (one entry per tensor: the 8-bit optimizer and
    the step's temporaries depend on tensor sizes, not only on their sum)."""
    if s.method != "full":
        return [n for m in lora_targets(shape, s.targets)
                for n in (s.rank * m.in_features, m.out_features * s.rank)]
    matrices = [m.numel for m in shape.modules() if not (m.kind == "head" and shape.tied)]
    return matrices + [shape.hidden] * (2 * shape.layers + 1)


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes splice.quant holds for one NF4 weight of `numel` elements."""
    blocks = math.ceil(numel / block_size)
    scales = blocks + math.ceil(blocks / NF4_GROUP) * FP32 + FP32 if double_quant else blocks * FP32
    return math.ceil(numel / 2) + scales


def frozen_weight_bytes(shape: ModelShape, s: PlanSettings) -> int:
    e = DTYPE_BYTES[s.dtype]
    if s.method == "full":
        return 0
    if s.method == "lora":
        return shape.params * e
    linears = [m.numel for m in shape.modules() if m.kind == "linear"]
    kept = shape.params - sum(linears)            # embeddings, norms, an untied head
    return sum(nf4_bytes(n, s.quant_block_size, s.double_quant) for n in linears) + kept * e


def optimizer_bytes(tensors: list[int], s: PlanSettings) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer state for these trainable tensors."""
    master = FP32 if s.dtype != "fp32" else 0
    if s.optimizer == "adamw8bit":
        moments = sum(2 * n + 2 * FP32 * math.ceil(n / EIGHT_BIT_BLOCK) if n >= EIGHT_BIT_MIN
                      else 2 * FP32 * n for n in tensors)
    else:
        moments = 2 * FP32 * sum(tensors)
    state = moments + master * sum(tensors)
    return (0, state) if s.optimizer == "paged_adamw" else (state, 0)


def step_transient(shape: ModelShape, tensors: list[int], s: PlanSettings) -> int:
    """Temporaries of the optimizer step (or of the last backward op, if larger).

    AdamW forms sqrt(v)/c + eps for one tensor at a time: two fp32 tensors of its size at once.
    The paged optimizer also holds the tensor's two paged-in moments; the 8-bit one decodes
    m and v a chunk at a time (about six fp32 chunk-sized buffers). Full fine-tuning ends
    backward with the embedding's dense gradient, added into the head's when tied."""
    largest = max(tensors)
    if s.optimizer == "adamw8bit":
        transient = 6 * min(largest, EIGHT_BIT_CHUNK) * FP32
    else:
        transient = (4 if s.optimizer == "paged_adamw" else 2) * largest * FP32
    if s.method == "full":
        transient = max(transient, shape.vocab * shape.hidden * DTYPE_BYTES[s.dtype])
    return transient


# --- activations -------------------------------------------------------------------------

# Note: Activations of a llama block
# What autograd keeps per token of one block, training with splice's fused LoRA layers and
# transformers' SDPA attention (a flash / memory-efficient kernel: no T×T score matrix is
# kept, so the count is linear in the sequence length), e = bytes of dtype:
#     the two RMSNorm inputs, upcast to fp32, and their 1/rms       2·d·4 + 2·4
#     the two normalised inputs of the projections (q/k/v, gate/up)  2·d·e
#     q after RoPE and the attention output                          2·h·hd·e
#     k after RoPE and v                                             2·k·hd·e
#     the attention's log-sum-exp per head                           h·4
#     gate output, silu(gate), up output, their product              4·f·e
#     full fine-tuning only: each norm's pre-weight normalised x     2·d·e
# For SmolLM2 in fp32 that is 9,995 floats per token and block for LoRA, what torch's
# saved-tensor hooks count on the real model. LoRA keeps nothing more: its layer keeps only
# its input (the same tensor as the base layer's) and recomputes x·Aᵀ in backward.
# Gradient checkpointing keeps only each block's input (d·e per token) and recomputes one
# block at a time in backward, so one block's full set comes back at the peak.
# Outside the blocks: the final norm (d·4 + 4, and d·e more under full fine-tuning); splice's
# fused loss (splice.train.loss) never materialises the (tokens × V) logits: it keeps one
# chunk's fp32 logits (plus two compute-dtype copies under bf16) and the copied hidden rows
# while it runs, and hands backward the gradient of the hidden states (n·d·e). A block's
# backward briefly holds gradients of its widest tensors: about 3 of the f-wide and 2 of the
# d-wide ones per token. Under qlora each projection's weight is dequantized for its matmul
# (forward and backward) into a scratch buffer kept per weight shape (`dequant_bytes`).


def block_bytes_per_token(shape: ModelShape, s: PlanSettings) -> int:
    """Bytes one block keeps per token for backward (see Note: Activations of a llama block)."""
    e, d = DTYPE_BYTES[s.dtype], shape.hidden
    kept = (2 * d * FP32 + 2 * FP32 + 2 * d * e + 2 * shape.q_dim * e + 2 * shape.kv_dim * e
            + shape.heads * FP32 + 4 * shape.intermediate * e)
    return kept + (2 * d * e if s.method == "full" else 0)


def activation_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """Activation bytes at their peak (the start of backward); see Note: Activations of a llama
    block."""
    e, d, tokens = DTYPE_BYTES[s.dtype], shape.hidden, s.batch * s.seq
    block = block_bytes_per_token(shape, s) * tokens
    kept = shape.layers * (tokens * d * e if s.grad_checkpointing else block)
    final_norm = tokens * (d * FP32 + FP32 + (d * e if s.method == "full" else 0))
    hidden_grad = tokens * d * e
    chunk = min(s.loss_chunk, tokens) * shape.vocab * (FP32 + (2 * e if e != FP32 else 0))
    loss_forward = tokens * d * e + chunk
    backward = tokens * (3 * shape.intermediate + 2 * d) * e
    if s.grad_checkpointing:
        backward += block
    return kept + final_norm + hidden_grad + max(loss_forward, backward) + dequant_bytes(shape, s)


def dequant_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """qlora: splice.quant dequantizes each 4-bit weight into a scratch buffer kept per distinct
    weight shape (four for a llama block; see splice.quant.kernels), plus one weight's worth of
    decoding temporaries."""
    if s.method != "qlora":
        return 0
    sizes = {(out_f, in_f): out_f * in_f for _, out_f, in_f in shape.block_linears()}
    return (sum(sizes.values()) + max(sizes.values())) * DTYPE_BYTES[s.dtype]
