"""All-or-nothing module surgery: every change registers its undo, and a failure rolls back.

Attach and load go through a Transaction so that a failure (a bad target, a shape mismatch in a
file) leaves the model exactly as it was: same modules, same weights, same requires_grad flags.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


class Transaction:
    """Use as `with Transaction(model) as tx:`; changes made through `tx` undo on an exception."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.undo: list[Callable[[], None]] = []
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def on_undo(self, action: Callable[[], None]) -> None:
        self.undo.append(action)

    def swap_module(self, path: str, new: nn.Module) -> nn.Module:
        parent, attr = parent_of(self.model, path)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self.on_undo(lambda: setattr(parent, attr, old))
        return old

    def copy_into(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite a tensor in place, keeping its old value for rollback."""
        old = param.detach().clone()
        with torch.no_grad():
            param.copy_(value)
        self.on_undo(lambda: param.data.copy_(old))

    def rollback(self) -> None:
        for action in reversed(self.undo):
            action()
        self.undo.clear()
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
