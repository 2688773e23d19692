"""make_optimizer: each name builds its optimizer with the given hyper-parameters; others fail
with a message that lists the valid names."""

from __future__ import annotations

import pytest
import torch

from splice.core.errors import SpliceError
from splice.optim import (OPTIMIZER_NAMES, AdamW8bit, OptimizerError, PagedAdamW,
                          make_optimizer)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("paged_adamw", PagedAdamW),
                                       ("adamw8bit", AdamW8bit)])
def test_names_build_their_optimizer(name, cls):
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = make_optimizer(name, params, lr=2e-4, weight_decay=0.05, betas=(0.8, 0.95))
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (2e-4, 0.05, (0.8, 0.95))
    assert group["params"] == params


def test_names_are_the_three_documented():
    assert OPTIMIZER_NAMES == ("adamw", "paged_adamw", "adamw8bit")


def test_parameter_groups_pass_through():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer("paged_adamw", [{"params": [a]}, {"params": [b], "lr": 1.0}],
                               lr=1e-3, weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1.0]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(OptimizerError, match="adamw, paged_adamw, adamw8bit") as info:
        make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.0)
    assert isinstance(info.value, SpliceError) and isinstance(info.value, ValueError)
    assert "'sgd'" in str(info.value)


def test_train_config_offers_exactly_the_optimizers_the_factory_builds():
    from splice.config.train import OPTIMIZERS
    from splice.optim import OPTIMIZER_NAMES
    assert tuple(OPTIMIZERS) == tuple(OPTIMIZER_NAMES)
