"""peft is the reference for the adapter file format: its files load here, ours load there.

Every case perturbs the adapter away from its zero init (and, where the config trains them, the
biases and saved module copies), so equal logits mean the tensors, keys, scalings and routing all
agree. Tolerance 1e-5 absolute: the two libraries order the same fp32 additions differently.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import splice
from helpers import logits, token_ids

ATOL = 1e-5


@dataclass(frozen=True)
class PeftCase:
    id: str
    kind: str                          # "llama" | "gpt2"
    peft_kwargs: dict
    # substrings of parameter names the case also trains (biases) and so perturbs
    perturb_also: tuple[str, ...] = ()
    save_kwargs: dict = field(default_factory=dict)


QV = ["q_proj", "v_proj"]
PEFT_MADE = [
    PeftCase("plain", "llama", dict(r=4, lora_alpha=8, target_modules=QV)),
    PeftCase("rslora", "llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=QV)),
    PeftCase("patterns", "llama", dict(
        r=4, lora_alpha=8, target_modules=QV,
        rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 3},
        alpha_pattern={"q_proj": 5, "layers.1.self_attn.v_proj": 7})),
    PeftCase("modules-to-save", "llama", dict(r=4, target_modules=QV, modules_to_save=["lm_head"])),
    PeftCase("regex", "llama", dict(r=4, target_modules=r".*\.(q_proj|down_proj)")),
    PeftCase("layers-to-transform", "llama", dict(r=4, target_modules=QV, layers_to_transform=[1])),
    PeftCase("embedding", "llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    PeftCase("bias-lora-only-conv1d", "gpt2",
             dict(r=4, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True),
             perturb_also=("c_attn.base_layer.bias",)),
    PeftCase("bias-all-conv1d", "gpt2",
             dict(r=4, target_modules=["c_attn"], bias="all", fan_in_fan_out=True),
             perturb_also=(".bias",)),
    PeftCase("all-linear", "llama", dict(r=4, target_modules="all-linear")),
    PeftCase("all-linear-conv1d", "gpt2", dict(r=4, target_modules="all-linear", fan_in_fan_out=True)),
]
BY_ID = {case.id: case for case in PEFT_MADE}


@pytest.fixture
def models(tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


@torch.no_grad()
def perturb(model, name_parts=("lora_", "modules_to_save"), seed=0, scale=0.05) -> None:
    """Add seeded noise to every parameter whose name contains one of `name_parts`."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(part in name for part in name_parts):
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def peft_made(case: PeftCase, base, folder):
    """A peft model for `case` with non-zero adapter weights, saved to `folder`."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**case.peft_kwargs)).eval()
    perturb(peft_model, ("lora_", "modules_to_save") + case.perturb_also)
    peft_model.save_pretrained(folder, **case.save_kwargs)
    return peft_model


def splice_config(peft_kwargs: dict) -> splice.LoRAConfig:
    """The splice config that means the same as peft keyword arguments (spelled out by hand)."""
    renames = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
    kwargs = {renames.get(k, k): v for k, v in peft_kwargs.items() if k != "task_type"}
    kwargs.pop("fan_in_fan_out", None)  # detected from the module type on attach
    return splice.LoRAConfig(**kwargs)


def tensor_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


# -- peft saves, splice loads -------------------------------------------------------------------

@pytest.mark.parametrize("case", PEFT_MADE, ids=[c.id for c in PEFT_MADE])
def test_peft_made_adapter_loads_with_equal_logits(case, models, tmp_path):
    base = models[case.kind]
    ids = token_ids(base)
    base_logits = logits(base, ids)
    peft_model = peft_made(case, base, tmp_path)
    expected = logits(peft_model, ids)
    # The perturbation must matter, or equal logits would prove nothing.
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    fresh = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splice.load_adapter(fresh, tmp_path)
    # A plain peft file has no key splice should warn about (peft writes some defaults always).
    assert not [w for w in caught if "adapter config" in str(w.message)], \
        [str(w.message) for w in caught]
    torch.testing.assert_close(logits(fresh, ids), expected, atol=ATOL, rtol=0)


def test_peft_embedding_file_carries_base_weights_and_splice_accepts_them(models, tmp_path):
    """peft saves an adapted embedding's full base table too (`...base_layer.weight`)."""
    case = BY_ID["embedding"]
    base = models["llama"]
    peft_model = peft_made(case, base, tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensor_shapes(tmp_path)
    # Make the stored base table differ from the fresh model's, so loading it is observable.
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    splice.load_adapter(fresh, tmp_path)
    ids = token_ids(base)
    torch.testing.assert_close(logits(fresh, ids), logits(peft_model, ids), atol=ATOL, rtol=0)


def test_rank_and_alpha_patterns_give_per_module_shapes_and_scalings(models, tmp_path):
    case = BY_ID["patterns"]
    peft_made(case, models["llama"], tmp_path)
    fresh = copy.deepcopy(models["llama"])
    splice.load_adapter(fresh, tmp_path)
    layers = fresh.model.layers
    expected = {  # path: (rank, scaling = alpha / rank)
        0: {"q_proj": (2, 5 / 2), "v_proj": (4, 8 / 4)},
        1: {"q_proj": (2, 5 / 2), "v_proj": (3, 7 / 3)},
    }
    for index, by_module in expected.items():
        for module_name, (rank, scaling) in by_module.items():
            module = getattr(layers[index].self_attn, module_name)
            assert module.lora_A["default"].weight.shape[0] == rank, (index, module_name)
            assert module.scaling["default"] == pytest.approx(scaling), (index, module_name)


# -- splice saves, peft loads (the configs beyond the contract matrix) -------------------------

REVERSE = [BY_ID["modules-to-save"], BY_ID["bias-lora-only-conv1d"], BY_ID["bias-all-conv1d"],
           BY_ID["layers-to-transform"], BY_ID["patterns"]]


@pytest.mark.parametrize("case", REVERSE, ids=[c.id for c in REVERSE])
def test_splice_made_adapter_loads_in_peft_with_equal_logits(case, models, tmp_path):
    base = models[case.kind]
    ids = token_ids(base)
    base_logits = logits(base, ids)
    model = copy.deepcopy(base)
    splice.attach(model, splice_config(case.peft_kwargs))
    # Perturb everything that trains: the adapter, saved module copies, and the biases.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for _, param in trainable:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    if case.perturb_also:
        assert any(n.endswith(".bias") for n, _ in trainable)
    expected = logits(model, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)
    splice.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=ATOL, rtol=0)


# -- the files themselves -----------------------------------------------------------------------

KEY_CASES = [BY_ID[i] for i in ("plain", "patterns", "modules-to-save", "regex", "layers-to-transform",
                                "bias-lora-only-conv1d", "bias-all-conv1d", "all-linear",
                                "all-linear-conv1d")]
# peft also stores an adapted embedding's whole base table unless told not to; splice does not
# (the base model has it). With save_embedding_layers=False the two files hold the same keys.
KEY_CASES.append(PeftCase("embedding", "llama", BY_ID["embedding"].peft_kwargs,
                          save_kwargs={"save_embedding_layers": False}))


@pytest.mark.parametrize("case", KEY_CASES, ids=[c.id for c in KEY_CASES])
def test_tensor_keys_and_shapes_equal_peft_for_the_same_config(case, models, tmp_path):
    base = models[case.kind]
    peft_made(case, base, tmp_path / "peft")
    model = copy.deepcopy(base)
    splice.attach(model, splice_config(case.peft_kwargs))
    splice.save_adapter(model, tmp_path / "splice")
    ours, theirs = tensor_shapes(tmp_path / "splice"), tensor_shapes(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs


def test_adapter_config_json_has_peft_keys_and_types(models, tmp_path):
    base = models["llama"]
    model = copy.deepcopy(base)
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    splice.save_adapter(model, tmp_path / "splice")
    ours = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())

    assert ours["peft_type"] == "LORA"
    assert ours["task_type"] == "CAUSAL_LM"
    assert type(ours["r"]) is int and ours["r"] == 4
    assert isinstance(ours["lora_alpha"], (int, float)) and ours["lora_alpha"] == 8
    assert ours["target_modules"] == ["q_proj", "v_proj"]
    assert ours["bias"] == "none" and ours["use_rslora"] is False and ours["use_dora"] is False

    # Against the oracle: every key we write, peft writes too, with the same value.
    peft_made(PeftCase("cfg", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM")), base, tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    theirs["target_modules"] = sorted(theirs["target_modules"])  # peft writes a set's order
    assert {k: theirs[k] for k in ours} == ours


def test_adapter_config_json_of_a_gpt2_adapter_records_fan_in_fan_out(models, tmp_path):
    model = copy.deepcopy(models["gpt2"])
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["c_attn"], bias="lora_only"))
    splice.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["fan_in_fan_out"] is True
    assert data["bias"] == "lora_only"
    assert data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == ["c_attn"]
