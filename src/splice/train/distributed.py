"""Data-parallel training across processes (`torchrun --nproc_per_node N -m splice train ...`).

Gloo on CPU, NCCL on GPUs. Each rank takes its share of every optimizer step's micro-batches;
gradients are averaged by DistributedDataParallel, and the loss is normalised by the global
count of supervised tokens so N processes match one process at the same global batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not torch_dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch_dist.init_process_group(backend=backend)
        return cls(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size())

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        torch_dist.all_reduce(tensor)
        return tensor.item()

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(model)

    @contextlib.contextmanager
    def no_sync_unless(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.enabled and not last and hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
