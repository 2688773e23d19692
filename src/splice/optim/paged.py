"""PagedAdamW: AdamW whose state lives in host memory and visits the device one tensor at a time.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) pages optimizer state out of GPU memory so that
it does not add to the memory peak. Here the paging is explicit and per parameter:

    for each parameter θ with a gradient:
        m, v ← copy θ's host state to θ's device          (page in)
        AdamW update of θ, m, v on the device
        copy m, v back to host memory                      (page out)

so the device holds the state of one parameter at a time: the optimizer adds 2× the largest
parameter to device memory instead of 2× all of them. The host copies are pinned when the
parameter is on a CUDA device, which lets both copies run asynchronously on the current stream
(ordered with the update kernels); the step waits for the last page-out before it returns, so
host state is complete whenever the caller can see it. On a CPU parameter the "device" is the
host: paging in returns the host tensor itself and paging out has nothing to copy, through the
same code path. The arithmetic is `adamw_update_`, bit-equal to torch.optim.AdamW (see Note:
Bit-equal to torch.optim.AdamW), and the state keys (step, exp_avg, exp_avg_sq) are torch's, so
state dicts load across the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from splice.optim.state_io import check_state_shape, load_state_dict_placed
from splice.optim.update import AdamWFamily, AdamWHyper, adamw_update_

MOMENTS = ("exp_avg", "exp_avg_sq")


def host_buffer(like: Tensor) -> Tensor:
    """A zeroed host tensor shaped and typed like ``like``, pinned when ``like`` is on CUDA."""
    pin = like.device.type == "cuda"
    return torch.zeros(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)


def page_in(host: Tensor, device: torch.device) -> Tensor:
    """The host tensor on ``device``: a copy queued on the current stream, or ``host`` itself."""
    return host.to(device, non_blocking=True)


def page_out(paged: Tensor, host: Tensor) -> None:
    """Write a paged-in tensor back to its host copy (nothing to do if they are one tensor)."""
    if paged is not host:
        host.copy_(paged, non_blocking=True)


def wait_for_pages(devices: Iterable[torch.device]) -> None:
    """Block until the queued page-outs to host memory have landed."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


class PagedAdamW(AdamWFamily):
    """AdamW (decoupled weight decay) with its state in host memory, paged per parameter.

    θ ← θ(1 − lr·λ); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    θ ← θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)

    Same arguments and defaults as torch.optim.AdamW (no amsgrad, maximize, foreach, fused).
    State per parameter, in host memory: step (fp32 scalar), exp_avg and exp_avg_sq (the
    parameter's shape and dtype).
    """

    def _finish_step(self, devices: set[torch.device]) -> None:
        wait_for_pages(devices)

    def _update(self, param: Tensor, hyper: AdamWHyper) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state.update({name: host_buffer(param) for name in MOMENTS})
        state["step"] += 1
        exp_avg, exp_avg_sq = (page_in(state[name], param.device) for name in MOMENTS)
        adamw_update_(param, param.grad, exp_avg, exp_avg_sq, float(state["step"]), hyper)
        page_out(exp_avg, state["exp_avg"])
        page_out(exp_avg_sq, state["exp_avg_sq"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (ours or torch.optim.AdamW's) into host memory, never the device."""
        load_state_dict_placed(self, state_dict, _place_on_host)


def _place_on_host(param: Tensor, name: str, value: Any) -> Any:
    """A fresh host copy of a saved state value: step as an fp32 scalar, moments as the param."""
    if name == "step":
        return torch.tensor(float(value), dtype=torch.float32)
    if name in MOMENTS:
        check_state_shape(param, name, value, tuple(param.shape))
        host = host_buffer(param)
        host.copy_(value)  # casts to the parameter's dtype, as torch's loading does
        return host
    return value
