"""Optimizer state tensors: loading them where an optimizer keeps them, and counting their bytes.

torch.optim.Optimizer.load_state_dict casts every saved state tensor to its parameter's device
and dtype. That is wrong for the optimizers here: a paged optimizer keeps its state in host
memory (loading it onto the device first would allocate the whole state there, the peak paging
exists to avoid), and an 8-bit optimizer keeps uint8 codes that a cast to fp32 would corrupt.
`load_state_dict_placed` loads the parameter groups the torch way and hands each state tensor
to the optimizer's own placement function instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor

Place = Callable[[Tensor, str, Any], Any]
"""place(param, key, saved value) -> the value to keep in optimizer.state[param][key]."""


def load_state_dict_placed(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any],
                           place: Place) -> None:
    """torch's Optimizer.load_state_dict, except that state values go through ``place``.

    The groups are checked and loaded by torch (same errors for a mismatched dict); saved
    parameter ids map to this optimizer's parameters in group order, as torch maps them.
    Load-state-dict pre-hooks see the dict without its per-parameter state and post-hooks
    run before that state is placed.
    """
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    id_map = dict(zip(saved_ids, params))
    for key, entry in saved_state.items():
        if key in id_map:
            param = id_map[key]
            optimizer.state[param] = {name: place(param, name, value)
                                      for name, value in entry.items()}
        else:
            optimizer.state[key] = entry  # state of no parameter: kept as is, as torch does


def check_state_shape(param: Tensor, name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    """A saved state tensor must fit the parameter it is loaded for."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)} but the "
                         f"parameter of shape {tuple(param.shape)} needs {tuple(shape)}; the "
                         "state dict belongs to another model or parameter order")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (step counters included)."""
    return sum(value.numel() * value.element_size()
               for entry in optimizer.state.values() for value in entry.values()
               if isinstance(value, Tensor))
