"""The headline cases: LLaMA 7B and 65B under full fine-tuning, LoRA and QLoRA.

The setup is QLoRA's (Dettmers et al. 2023, arXiv:2305.14314): bf16, LoRA rank 64 on every
block projection, one 512-token sequence per step, gradient checkpointing; full fine-tuning and
LoRA with AdamW, QLoRA with the paged optimizer. Full fine-tuning costs 16 bytes per parameter
before activations (bf16 weights and gradients, an fp32 master copy, two fp32 moments); QLoRA
brings the 65B model under a 48 GB GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from splice.plan.estimate import METHODS, MemoryPlan, plan_memory
from splice.plan.shapes import shape_from_preset

EXAMPLE_SIZES = ("7B", "65B")
EXAMPLE_SETTINGS = {"rank": 64, "targets": "all-linear", "batch": 1, "seq": 512,
                    "grad_checkpointing": True, "dtype": "bf16"}
EXAMPLE_OPTIMIZERS = {"full": "adamw", "lora": "adamw", "qlora": "paged_adamw"}
GPU_48GB = 48 * 10 ** 9


@dataclass(frozen=True)
class Example:
    title: str
    plans: tuple[MemoryPlan, ...]   # full, lora, qlora

    @property
    def full_bytes_per_param(self) -> float:
        """Weights, gradients and optimizer state of full fine-tuning per parameter."""
        full = self.plans[0]
        return (full.trainable_weights + full.gradients + full.optimizer_state
                + full.host_optimizer_state) / full.params


def example_plans() -> tuple[Example, ...]:
    """The headline cases, one per model size."""
    examples = []
    for size in EXAMPLE_SIZES:
        shape = shape_from_preset(size, "llama")
        plans = tuple(plan_memory(shape, method, optimizer=EXAMPLE_OPTIMIZERS[method],
                                  **EXAMPLE_SETTINGS) for method in METHODS)
        examples.append(Example(f"LLaMA {size}", plans))
    return tuple(examples)
