"""PiSSA, OLoRA and LoftQ on tiny random models: closed forms, step-0 outputs, undo on delete."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import logits, token_ids

import splice
from splice.config.lora import DATA_INITS, LORA_INITS, InitOptions
from splice.core.errors import AdapterError
from splice.inits import INITS
from splice.inits.loftq import loftq_init, quantize_adapted_bases, quantize_roundtrip
from splice.inits.pissa import pissa_init
from splice.quant.linear4bit import Linear4bit

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def test_registry_names_match_the_config():
    assert set(INITS) == set(LORA_INITS) - {"default", "gaussian"}
    assert {name for name, spec in INITS.items() if spec.needs_data} == set(DATA_INITS)


def weight_like(out: int = 48, d_in: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, d_in, generator=torch.Generator().manual_seed(seed))


def test_pissa_is_the_scaled_top_r_part():
    w, rank, s = weight_like(), 5, 0.5
    init = pissa_init(w, rank, s, InitOptions())
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    torch.testing.assert_close((s * init.b @ init.a).double(), top, atol=1e-4, rtol=0)
    torch.testing.assert_close(init.base + s * init.b @ init.a, w, atol=1e-5, rtol=0)
    # A's rows and B's columns carry √(S/s) each: BᵀB = AAᵀ = diag(S_r/s)
    torch.testing.assert_close(init.a @ init.a.T, torch.diag(sv[:rank].float() / s), atol=1e-3, rtol=1e-4)


def test_pissa_randomized_svd_approaches_the_exact_one():
    u = torch.linalg.qr(weight_like(64, 64, 1))[0]
    w = (u * torch.logspace(1, -3, 64)) @ torch.linalg.qr(weight_like(64, 64, 2))[0].T  # decaying spectrum
    exact = pissa_init(w, 4, 1.0, InitOptions())
    torch.manual_seed(0)
    fast = pissa_init(w, 4, 1.0, InitOptions(pissa_niter=4))
    torch.testing.assert_close(fast.b @ fast.a, exact.b @ exact.a, atol=1e-3, rtol=0)


def test_olora_is_the_qr_basis():
    w, rank, s = weight_like(), 4, 2.0
    init = INITS["olora"].make(w, rank, s, InitOptions())
    torch.testing.assert_close(init.b.T @ init.b, torch.eye(rank), atol=1e-5, rtol=0)  # orthonormal B
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(init.b @ init.a, q[:, :rank] @ r[:rank], atol=1e-5, rtol=0)
    torch.testing.assert_close(init.base, w - s * q[:, :rank] @ r[:rank], atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_residual_inits_keep_the_model_and_delete_restores_the_base(init, kind, tiny_llama, tiny_gpt2):
    model = tiny_llama if kind == "llama" else tiny_gpt2
    ids = token_ids(model)
    before = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    splice.attach(model, splice.LoRAConfig(rank=4, init=init, target_modules=TARGETS[kind]))
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    changed = [n for n, p in model.named_parameters() if "base_layer.weight" in n
               and not torch.equal(p, weights[n.replace(".base_layer", "")])]
    assert changed, "the base should hold the residual"
    splice.delete_adapter(model, "default")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


def test_a_failed_attach_puts_the_bases_back(tiny_llama):
    weights = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    # down_proj is 32 x 64: PiSSA cannot give it rank 40, and it comes after q_proj/v_proj
    config = splice.LoRAConfig(rank=4, init="pissa", target_modules=TARGETS["llama"],
                               rank_pattern={"down_proj": 40})
    with pytest.raises(AdapterError):
        splice.attach(tiny_llama, config)
    assert not splice.list_adapters(tiny_llama)
    for name, param in tiny_llama.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_beats_plain_quantization_and_keeps_the_base_on_the_grid(bits):
    w, rank, s = weight_like(64, 128) * 0.05, 8, 2.0
    plain = (w - quantize_roundtrip(w, bits)).norm()
    errors = []
    for iterations in (1, 3):
        init = loftq_init(w, rank, s, InitOptions(loftq_bits=bits, loftq_iterations=iterations))
        errors.append((w - (init.base + s * init.b @ init.a)).norm())
        # on the grid: quantizing it again changes it only by the 8-bit rounding of NF4's
        # double-quantized block scales (int8 rows: not at all)
        tol = 1e-3 * init.base.abs().max().item() if bits == 4 else 1e-7
        torch.testing.assert_close(quantize_roundtrip(init.base, bits), init.base, atol=tol, rtol=0)
        assert not init.residual
    assert errors[0] < plain and errors[1] <= errors[0] * 1.001


def test_loftq_qlora_base_is_the_quantized_weight(tiny_llama):
    ids = token_ids(tiny_llama)
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, init="loftq", target_modules="all-linear"))
    fp_bases = {path: layer.base_layer.weight.detach().clone()
                for path, layer in tiny_llama.named_modules() if hasattr(layer, "initial_updates")}
    before = logits(tiny_llama, ids)
    assert quantize_adapted_bases(tiny_llama) == len(fp_bases)
    for path, weight in fp_bases.items():
        base = tiny_llama.get_submodule(path).base_layer
        assert isinstance(base, Linear4bit)
        # the 4-bit form of deq(Q) is Q, up to the 8-bit rounding of the block scales
        torch.testing.assert_close(base.dequantize(), weight, atol=2e-3 * weight.abs().max().item(), rtol=0)
    torch.testing.assert_close(logits(tiny_llama, ids), before, atol=5e-3, rtol=0)


def test_base_changing_inits_refuse_a_4bit_base(tiny_llama):
    with pytest.raises(AdapterError, match="4-bit"):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=4, init="pissa", target_modules=["q_proj"]),
                      quantize="nf4")


@pytest.mark.parametrize("init", sorted(DATA_INITS))
def test_data_inits_refuse_plain_attach(init, tiny_llama):
    with pytest.raises(AdapterError, match="needs training batches"):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=4, init=init, target_modules=["q_proj"]))
    assert not splice.list_adapters(tiny_llama)


def test_merge_of_a_pissa_adapter_gives_the_trained_weight(tiny_llama):
    original = copy.deepcopy(tiny_llama)
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, init="pissa", target_modules=["q_proj"]))
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.01)
    expected = (original.model.layers[0].self_attn.q_proj.weight
                + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                                              - layer.initial_updates["default"].b @ layer.initial_updates["default"].a))
    merged = splice.merge_and_unload(tiny_llama)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-5, rtol=0)
