"""The AdamW update of one tensor, and the checks on its hyper-parameters.

AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), step t = 1, 2, ... with gradient g:

    θ ← θ · (1 − lr·λ)                               decoupled weight decay
    m ← β₁·m + (1 − β₁)·g                            written as a lerp of m towards g
    v ← β₂·v + (1 − β₂)·g²
    θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

Every optimizer in this package runs `adamw_update_`, so they differ from each other only in
where the state (m, v) lives and how it is stored, never in the arithmetic.

# Note: Bit-equal to torch.optim.AdamW
The order of operations, the in-place ops and the Python-float scalars are those of
torch.optim.AdamW's single-tensor path (the one it takes on CPU), so the same inputs give the
same bits: the bias corrections are Python floats from a float step count, the step size
folds into addcdiv's scalar, and √(1 − β₂ᵗ) divides √v before ε is added. Reordering any of
these changes the last bits of θ, and after a few hundred steps the difference is visible;
tests/optim/test_paged_adamw.py checks torch.equal against torch.optim.AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.core.errors import SpliceError


class OptimizerError(SpliceError, ValueError):
    """An optimizer name or hyper-parameter is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class AdamWHyper:
    """The hyper-parameters of one AdamW step, read from a parameter group."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @staticmethod
    def from_group(group: Mapping[str, Any]) -> AdamWHyper:
        for flag in ("amsgrad", "maximize"):  # may come in with a torch.optim.AdamW state dict
            if group.get(flag):
                raise OptimizerError(f"a parameter group asks for {flag}=True, which this "
                                     "optimizer does not implement; use torch.optim.AdamW")
        beta1, beta2 = group["betas"]
        return AdamWHyper(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                          float(group["weight_decay"]))


def check_adamw_args(lr: float, betas: tuple[float, float], eps: float,
                     weight_decay: float) -> None:
    """Raise OptimizerError naming the first invalid AdamW hyper-parameter."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise OptimizerError(f"lr={lr!r}: give a finite number >= 0 (e.g. 1e-3)")
    if len(betas) != 2:
        raise OptimizerError(f"betas={betas!r}: give two numbers (beta1, beta2), e.g. (0.9, 0.999)")
    for index, beta in enumerate(betas):
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise OptimizerError(f"betas[{index}]={beta!r}: give a number in [0, 1), "
                                 "e.g. betas=(0.9, 0.999)")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise OptimizerError(f"eps={eps!r}: give a finite number >= 0 (e.g. 1e-8)")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise OptimizerError(f"weight_decay={weight_decay!r}: give a finite number >= 0 "
                             "(0 turns weight decay off)")


def check_grad(param: Tensor) -> None:
    """Sparse gradients have no dense moments to update: refuse them with the fix."""
    if param.grad.is_sparse:
        raise OptimizerError("AdamW got a sparse gradient; use torch.optim.SparseAdam for "
                             "sparse parameters, or make the embedding dense (sparse=False)")


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                  step: float, hyper: AdamWHyper) -> None:
    """One AdamW step, in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (same shapes).

    ``step`` is the number of this step (1 for the first), already counted. A complex
    parameter is updated as its real view (real and imaginary parts as separate entries).
    See Note: Bit-equal to torch.optim.AdamW.
    """
    if hyper.weight_decay != 0:
        param.mul_(1 - hyper.lr * hyper.weight_decay)
    if torch.is_complex(param):
        param, grad = torch.view_as_real(param), torch.view_as_real(grad)
        exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
    exp_avg.lerp_(grad, 1 - hyper.beta1)
    exp_avg_sq.mul_(hyper.beta2).addcmul_(grad, grad, value=1 - hyper.beta2)
    bias_correction1 = 1 - hyper.beta1**step
    bias_correction2 = 1 - hyper.beta2**step
    step_size = hyper.lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamWFamily(torch.optim.Optimizer):
    """What splice's AdamW variants share: torch.optim.AdamW's arguments and the step loop.
    A subclass says how one parameter is updated (`_update`), may refuse a parameter
    (`_check_param`) and may finish a step (`_finish_step`, e.g. wait for device copies)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        check_adamw_args(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step for every parameter that has a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices = set()
        for group in self.param_groups:
            hyper = AdamWHyper.from_group(group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                check_grad(param)
                self._check_param(param)
                self._update(param, hyper)
                devices.add(param.device)
        self._finish_step(devices)
        return loss

    def _check_param(self, param: Tensor) -> None:
        """Raise OptimizerError for a parameter this optimizer cannot update."""

    def _update(self, param: Tensor, hyper: "AdamWHyper") -> None:
        raise NotImplementedError

    def _finish_step(self, devices: set[torch.device]) -> None:
        """Called once after every parameter of a step was updated."""
