"""PagedAdamW against torch.optim.AdamW (the oracle): bit-equal parameters and state, on CPU.

torch.optim.AdamW takes its single-tensor path on CPU; PagedAdamW must reproduce it exactly
through many steps, several parameter groups, parameters that get no gradient on some or all
steps, fp32/bf16/complex parameters and state-dict round trips in both directions.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from splice.optim import OptimizerError, PagedAdamW
from splice.optim.paged import page_in, page_out

STEPS = 120


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (24,), (8, 3, 5), (40,), (6, 6)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(12, 7, generator=g).to(torch.bfloat16)))
    params.append(torch.nn.Parameter(torch.randn(9, dtype=torch.complex64, generator=g)))
    return params


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Three groups: defaults; own lr, betas and weight decay; no weight decay."""
    return [
        {"params": params[0:2]},
        {"params": params[2:4], "lr": 3e-2, "betas": (0.8, 0.99), "weight_decay": 0.1,
         "eps": 1e-6},
        {"params": params[4:], "weight_decay": 0.0},
    ]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    """Seeded gradients; params[1] gets one only on even steps, params[3] never."""
    g = torch.Generator().manual_seed(1000 + step)
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, dtype=p.dtype, generator=g).to(p.device)
        skip = (index == 1 and step % 2) or index == 3
        p.grad = None if skip else grad


def run(optimizer: torch.optim.Optimizer, params, steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        optimizer.step()


def assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), (a - b).abs().max()


def assert_same_state(ours: torch.optim.Optimizer, ours_params, ref: torch.optim.Optimizer,
                      ref_params) -> None:
    for p, q in zip(ours_params, ref_params):
        a, b = ours.state.get(p, {}), ref.state.get(q, {})
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_bit_equal_to_torch_adamw_over_many_steps():
    params, ref_params = make_params(), make_params()
    ours = PagedAdamW(groups(params), lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(groups(ref_params), lr=1e-2, weight_decay=0.05)
    run(ours, params, range(STEPS))
    run(ref, ref_params, range(STEPS))
    assert_same(params, ref_params)
    assert_same_state(ours, params, ref, ref_params)
    assert params[3] not in ours.state  # never had a gradient: no state, as in torch
    assert float(ours.state[params[1]]["step"]) == STEPS // 2
    assert not torch.equal(params[0], make_params()[0])  # the test moved the weights


def test_default_hyperparameters_match_torch():
    params, ref_params = make_params(1), make_params(1)
    ours, ref = PagedAdamW(params), torch.optim.AdamW(ref_params)
    assert ours.defaults["lr"] == ref.defaults["lr"]
    assert ours.defaults["betas"] == ref.defaults["betas"]
    assert ours.defaults["eps"] == ref.defaults["eps"]
    assert ours.defaults["weight_decay"] == ref.defaults["weight_decay"]
    run(ours, params, range(30))
    run(ref, ref_params, range(30))
    assert_same(params, ref_params)


def test_with_lr_scheduler_and_closure():
    params, ref_params = make_params(2), make_params(2)
    ours, ref = PagedAdamW(groups(params)), torch.optim.AdamW(groups(ref_params))
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ours, ref)]
    for step in range(20):
        for optimizer, ps, scheduler in ((ours, params, sched[0]), (ref, ref_params, sched[1])):
            def closure(ps=ps, step=step):
                set_grads(ps, step)
                return torch.tensor(float(step))

            assert float(optimizer.step(closure)) == step
            scheduler.step()
    assert_same(params, ref_params)


@pytest.mark.parametrize("direction", ["ours->ours", "torch->ours", "ours->torch"])
def test_state_dict_round_trip_continues_exactly(direction):
    """Train 40 steps, save, load into a fresh optimizer, train 40 more: equals 80 uninterrupted."""
    first, second = {"ours->ours": (PagedAdamW, PagedAdamW),
                     "torch->ours": (torch.optim.AdamW, PagedAdamW),
                     "ours->torch": (PagedAdamW, torch.optim.AdamW)}[direction]
    ref_params = make_params(3)
    ref = torch.optim.AdamW(groups(ref_params), lr=1e-2)
    run(ref, ref_params, range(80))

    params = make_params(3)
    before = first(groups(params), lr=1e-2)
    run(before, params, range(40))
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    after = second(groups(params), lr=0.5)  # the loaded groups bring lr back to 1e-2
    after.load_state_dict(saved)
    assert after.param_groups[0]["lr"] == 1e-2
    run(after, params, range(40, 80))
    assert_same(params, ref_params)


def test_loaded_state_is_a_private_host_copy():
    params = make_params(4)
    optimizer = PagedAdamW(groups(params))
    run(optimizer, params, range(3))
    saved = copy.deepcopy(optimizer.state_dict())
    fresh = PagedAdamW(groups(params))
    fresh.load_state_dict(saved)
    for entry in saved["state"].values():
        entry["exp_avg"].add_(1.0)  # must not reach the loaded optimizer
    for p in params:
        if p in fresh.state:
            state = fresh.state[p]
            assert state["exp_avg"].device.type == "cpu"
            assert state["exp_avg"].dtype == p.dtype
            assert state["step"].dtype == torch.float32
            assert torch.equal(state["exp_avg"], optimizer.state[p]["exp_avg"])


def test_state_dict_for_other_shapes_is_refused():
    params = make_params(5)
    optimizer = PagedAdamW(params)
    run(optimizer, params, range(2))
    saved = optimizer.state_dict()
    other = [torch.nn.Parameter(torch.zeros(p.numel() + 1)) for p in params]
    with pytest.raises(ValueError, match="has shape"):
        PagedAdamW(other).load_state_dict(saved)


def test_paging_seam_on_cpu_is_the_host_tensor():
    """On a CPU parameter paging in returns the host tensor itself (no copy), paging out is a no-op."""
    host = torch.arange(6.0)
    paged = page_in(host, torch.device("cpu"))
    assert paged is host
    page_out(paged, host)
    assert torch.equal(host, torch.arange(6.0))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr="), ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"), ({"eps": -1e-8}, "eps="),
    ({"weight_decay": float("nan")}, "weight_decay="),
])
def test_bad_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(OptimizerError, match=match):
        PagedAdamW(make_params(), **kwargs)


def test_sparse_gradient_is_refused():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(OptimizerError, match="SparseAdam"):
        PagedAdamW([p]).step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_stays_on_host_and_matches_torch():
    """CUDA parameters: state pinned in host memory, device memory back to params + grads after
    each step, and the same bits as torch's single-tensor AdamW on the device."""
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(6)[:5]]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PagedAdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    largest = max(p.numel() * p.element_size() for p in params)
    for step in range(10):
        set_grads(params, step)
        set_grads(ref_params, step)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ours.step()
        assert torch.cuda.memory_allocated() == before
        assert torch.cuda.max_memory_allocated() - before <= 4 * largest + 4096
        ref.step()
    assert_same(params, ref_params)
    for state in ours.state.values():
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].is_pinned()


def test_torch_state_dict_asking_for_amsgrad_is_refused():
    params = make_params(7)
    ref = torch.optim.AdamW(params, amsgrad=True)
    run(ref, params, range(1))
    ours = PagedAdamW(params)
    with pytest.raises(OptimizerError, match="amsgrad"):
        ours.load_state_dict(ref.state_dict())
        run(ours, params, range(1, 2))
