"""Shared test helpers: the contract-matrix cases and small utilities.

A method joins the contract matrix by appending a `MethodCase` to CASES (in its own section
below); each case states its own tolerances instead of the tests branching on method names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import splice
from splice.core.layer import adapter_layers


@dataclass(frozen=True)
class MethodCase:
    id: str
    make_config: Callable[[str], splice.AdapterConfig]  # model kind ("llama" | "gpt2") -> config
    merge_atol: float = 1e-5        # merged vs unmerged logits
    roundtrip_atol: float = 0.0     # save/load vs original logits (exact by default)
    peft_atol: float = 1e-5         # peft-loaded vs splice logits
    mergeable: bool = True
    peft_compatible: bool = True
    kinds: tuple[str, ...] = ("llama", "gpt2")
    # False where a fresh adapter changes the output by design (virtual tokens are attended to
    # from the start); the method's own tests check what holds at init instead.
    fresh_is_base: bool = True
    peft_extra_positions: int = 0   # leading logits positions peft returns and splice drops


def lora_targets(kind: str) -> list[str]:
    return {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}[kind]


CASES: list[MethodCase] = [
    MethodCase("lora", lambda kind: splice.LoRAConfig(rank=4, target_modules=lora_targets(kind))),
    MethodCase("lora-all-linear-rslora",
               lambda kind: splice.LoRAConfig(rank=4, alpha=8, use_rslora=True, target_modules="all-linear")),
    MethodCase("lora-patterns", lambda kind: splice.LoRAConfig(
        rank=4, target_modules=lora_targets(kind), init="gaussian",
        rank_pattern={lora_targets(kind)[0]: 2}, alpha_pattern={lora_targets(kind)[1]: 3.0})),
    MethodCase("lora-embedding", lambda kind: splice.LoRAConfig(
        rank=4, target_modules={"llama": ["embed_tokens", "o_proj"], "gpt2": ["wpe", "c_fc"]}[kind])),
    # IA³: the default targets (k/v/down; c_attn/mlp.c_proj, feed-forward down_proj/mlp.c_proj),
    # and every linear with the default feed-forward modules (the file records them as a regex).
    MethodCase("ia3", lambda kind: splice.IA3Config()),
    MethodCase("ia3-all-linear", lambda kind: splice.IA3Config(target_modules="all-linear")),
    # Bottleneck adapters: splice's own file format, not mergeable.
    MethodCase("adapter-houlsby", lambda kind: splice.BottleneckConfig(bottleneck_size=8),
               mergeable=False, peft_compatible=False),
    MethodCase("adapter-pfeiffer-gelu", lambda kind: splice.BottleneckConfig(
        placement="pfeiffer", bottleneck_size=8, activation="gelu", dropout=0.1),
               mergeable=False, peft_compatible=False),
    # Prompt / prefix tuning change the input: not mergeable, and not the base at step 0 (see
    # splice.methods.prompt, Note: Virtual tokens are never zero-effect). peft's prompt-tuning
    # logits keep the 3 virtual positions.
    MethodCase("prompt", lambda kind: splice.PromptTuningConfig(num_virtual_tokens=3),
               mergeable=False, fresh_is_base=False, peft_extra_positions=3),
    MethodCase("prefix", lambda kind: splice.PrefixTuningConfig(num_virtual_tokens=3),
               mergeable=False, fresh_is_base=False),
    MethodCase("prefix-projection", lambda kind: splice.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
               mergeable=False, fresh_is_base=False),
    # DoRA: LoRA's file format with use_dora and a magnitude vector per module.
    MethodCase("dora", lambda kind: splice.DoRAConfig(rank=4, target_modules=lora_targets(kind))),
]


def token_ids(model: nn.Module, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def randomize_adapter(model: nn.Module, name: str = "default", seed: int = 0, scale: float = 0.05) -> None:
    """Give every adapter tensor a non-trivial value so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for key, param in layer.adapter_parameters(name):
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(param + noise.to(param.dtype))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed operation must leave unchanged: structure, weights, grad flags."""
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "adapters": dict(splice.list_adapters(model))}


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["grad"] == after["grad"]
    assert before["adapters"] == after["adapters"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
