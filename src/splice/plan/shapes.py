"""The shape of a llama-style decoder: everything the memory planner needs to know about a model.

A llama-style block (Llama 1-3, Mistral, SmolLM2, TinyLlama) is

    x → RMSNorm → q, k, v projections → RoPE → attention → o_proj → + x
      → RMSNorm → down(silu(gate(x)) · up(x)) → + x

with no biases, so the parameters are a function of eight numbers: hidden size d, MLP width f,
layers L, attention heads h, key/value heads k, head size e, vocabulary V, and whether the
output head shares the input embedding's tensor. Per block: q, o (h·e × d), k, v (k·e × d),
gate, up (f × d), down (d × f), two norms (d each); plus the embedding (V × d), a final norm
(d) and, when untied, the head (V × d). SmolLM2-135M: 134,515,008 parameters.

`ModelShape.modules()` lists the weight matrices under the module paths transformers gives
them (`model.layers.3.self_attn.q_proj`), so adapter target rules select the same layers here
as on a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from splice.config.base import ConfigError, doc
from splice.models import load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EMBEDDING_PATH, HEAD_PATH = "model.embed_tokens", "lm_head"


@dataclass(frozen=True)
class ModuleShape:
    """One weight matrix: its module path, kind ('linear', 'embedding' or 'head') and shape."""

    path: str
    kind: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelShape:
    """A llama-style decoder's dimensions (see the module doc)."""

    hidden: int = doc("Hidden size d (the residual stream width).")
    intermediate: int = doc("MLP width f (gate/up output, down input).")
    layers: int = doc("Number of decoder blocks L.")
    heads: int = doc("Attention (query) heads h.")
    kv_heads: int = doc("Key/value heads k (k < h is grouped-query attention).")
    vocab: int = doc("Vocabulary size V.")
    tied: bool = doc("The output head is the input embedding's tensor (stored once).")
    head_dim: int = doc("Size of one attention head e; 0 means hidden // heads.", default=0)
    name: str = doc("A label for tables ('llama 7B', a model folder).", default="")

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelShape.{name}={value!r}: give a positive integer")
        if self.heads % self.kv_heads:
            raise ConfigError(f"ModelShape: heads={self.heads} is not a multiple of "
                              f"kv_heads={self.kv_heads}; each key/value head serves a whole "
                              "group of query heads")
        if self.head_dim == 0:
            if self.hidden % self.heads:
                raise ConfigError(f"ModelShape: hidden={self.hidden} is not divisible by "
                                  f"heads={self.heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        elif self.head_dim < 0:
            raise ConfigError(f"ModelShape.head_dim={self.head_dim}: give a positive integer "
                              "(or 0 for hidden // heads)")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, out_features, in_features) of one block's seven projections."""
        d, f = self.hidden, self.intermediate
        return (("q_proj", self.q_dim, d), ("k_proj", self.kv_dim, d), ("v_proj", self.kv_dim, d),
                ("o_proj", d, self.q_dim), ("gate_proj", f, d), ("up_proj", f, d),
                ("down_proj", d, f))

    def modules(self) -> tuple[ModuleShape, ...]:
        """Every weight matrix under its transformers module path; a tied head is listed (it is
        a module) but its tensor is the embedding's."""
        found = [ModuleShape(EMBEDDING_PATH, "embedding", self.vocab, self.hidden)]
        for i in range(self.layers):
            for name, out_f, in_f in self.block_linears():
                group = "self_attn" if name in ATTENTION else "mlp"
                found.append(ModuleShape(f"model.layers.{i}.{group}.{name}", "linear", out_f, in_f))
        found.append(ModuleShape(HEAD_PATH, "head", self.vocab, self.hidden))
        return tuple(found)

    @property
    def norm_params(self) -> int:
        """Two RMSNorm weights per block and the final one."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        matrices = sum(m.numel for m in self.modules() if not (m.kind == "head" and self.tied))
        return matrices + self.norm_params


# Published configurations (the models' config.json files). llama: LLaMA 1 (Touvron et al.
# 2023, arXiv:2302.13971) and TinyLlama-1.1B as "1B"; llama2: Llama 2; llama3: Llama 3 / 3.1
# (8B, 70B) and 3.2 (1B, 3B, tied); smollm2: SmolLM2 (tied).
_PRESETS: dict[str, dict[str, tuple[int, int, int, int, int, int, bool]]] = {
    #                hidden  inter   layers heads kv  vocab   tied
    "llama": {"1B": (2048, 5632, 22, 32, 4, 32000, False),
              "7B": (4096, 11008, 32, 32, 32, 32000, False),
              "13B": (5120, 13824, 40, 40, 40, 32000, False),
              "33B": (6656, 17920, 60, 52, 52, 32000, False),
              "65B": (8192, 22016, 80, 64, 64, 32000, False)},
    "llama2": {"7B": (4096, 11008, 32, 32, 32, 32000, False),
               "13B": (5120, 13824, 40, 40, 40, 32000, False),
               "70B": (8192, 28672, 80, 64, 8, 32000, False)},
    "llama3": {"1B": (2048, 8192, 16, 32, 8, 128256, True),
               "3B": (3072, 8192, 28, 24, 8, 128256, True),
               "8B": (4096, 14336, 32, 32, 8, 128256, False),
               "70B": (8192, 28672, 80, 64, 8, 128256, False)},
    "smollm2": {"135M": (576, 1536, 30, 9, 3, 49152, True),
                "360M": (960, 2560, 32, 15, 5, 49152, True),
                "1.7B": (2048, 8192, 24, 32, 32, 49152, True)},
}
ARCHES: tuple[str, ...] = tuple(_PRESETS)


def preset_names(arch: str | None = None) -> dict[str, tuple[str, ...]]:
    """The sizes `shape_from_preset` knows, per architecture family (or for one)."""
    arches = ARCHES if arch is None else (_check_arch(arch),)
    return {a: tuple(_PRESETS[a]) for a in arches}


def _check_arch(arch: str) -> str:
    if arch not in _PRESETS:
        raise ConfigError(f"--arch {arch!r} is not a known family: choose one of "
                          f"{', '.join(ARCHES)}")
    return arch


def shape_from_preset(size: str, arch: str = "llama") -> ModelShape:
    """A published model's shape by size ('7B', '65B', '135M'; case-insensitive) and family."""
    sizes = _PRESETS[_check_arch(arch)]
    key = next((k for k in sizes if k.lower() == size.strip().lower()), None)
    if key is None:
        raise ConfigError(f"--params {size!r}: {arch} has no such size; choose one of "
                          f"{', '.join(sizes)} (or another --arch: "
                          f"{', '.join(a for a in ARCHES if a != arch)})")
    d, f, layers, heads, kv, vocab, tied = sizes[key]
    return ModelShape(d, f, layers, heads, kv, vocab, tied, name=f"{arch} {key}")


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """The shape of a transformers config of a llama-style decoder (LlamaConfig, MistralConfig,
    ...). Raises ConfigError for configs of other layouts (GPT-2's fused projections, MoE)."""
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size")
    missing = [k for k in needed if getattr(config, k, None) is None]
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if missing or experts:
        why = f"it has no {', '.join(missing)}" if missing else "it is a mixture of experts"
        raise ConfigError(f"{type(config).__name__} is not a llama-style decoder config ({why}); "
                          "the planner models Llama/Mistral/SmolLM2-style blocks: use --params "
                          "with --arch instead")
    heads = config.num_attention_heads
    return ModelShape(hidden=config.hidden_size, intermediate=config.intermediate_size,
                      layers=config.num_hidden_layers, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      vocab=config.vocab_size,
                      tied=bool(getattr(config, "tie_word_embeddings", False)),
                      head_dim=getattr(config, "head_dim", None) or 0,
                      name=name or getattr(config, "name_or_path", "") or type(config).__name__)


def shape_from_model(model: Any, name: str = "") -> ModelShape:
    """The shape of a loaded transformers causal LM, checked against its parameter count (a
    model with biases, extra norms or another block layout raises instead of misleading)."""
    shape = shape_from_config(model.config, name)
    counted = sum(p.numel() for p in model.parameters())
    if counted != shape.params:
        raise ConfigError(f"{shape.name}: the model has {counted:,} parameters but a llama-style "
                          f"shape with its config's sizes has {shape.params:,}; the planner only "
                          "models bias-free llama-style blocks")
    return shape


def shape_from_name(name: str) -> ModelShape:
    """The shape of a bundled model alias or a local transformers folder (config only for a
    folder; a bundled alias is loaded, as its config lives in the converted cache)."""
    if (Path(name) / "config.json").is_file():
        return shape_from_config(AutoConfig.from_pretrained(name, local_files_only=True), name)
    model, _ = load_model(name)
    return shape_from_model(model, name)
