"""The configuration of a training run: nested sections, each a small frozen dataclass.

Presets are YAML files with the same sections; any field can be overridden from the command line
with a dotted path (`train.lr=2e-4`, `adapter.rank=16`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from splice.config.base import ConfigError, doc

# Every registered adapter method, plus 'qlora' (LoRA on an NF4 base) and 'full'. A test checks
# this against the registry (configs sit below the registry and do not import it).
TRAIN_METHODS = ("lora", "qlora", "dora", "ia3", "prompt", "prefix", "adapter", "full")
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit")


@dataclass(frozen=True)
class DataSection:
    path: str = doc("Training data: JSONL with {messages}, {prompt, completion} or {text} lines.", default="")
    eval_path: str | None = doc("Held-out JSONL for eval loss (and exact match for prompt/completion).",
                                default=None)
    max_len: int = doc("Longer sequences are truncated to this many tokens (and counted).", default=512)
    skip_bad: bool = doc("Skip malformed lines (counted) instead of stopping at the first.", default=False)

    def __post_init__(self) -> None:
        positive("data.max_len", self.max_len)


@dataclass(frozen=True)
class AdapterSection:
    """The adapter to train. Fields a method does not have are ignored for it; unset (None)
    fields take the method's own default."""

    method: str = doc("What trains: 'lora', 'qlora' (LoRA on a frozen NF4 4-bit base), 'dora', "
                      "'ia3', 'prompt' (prompt tuning), 'prefix' (prefix tuning), 'adapter' "
                      "(bottleneck adapters) or 'full' (every weight, the baseline).", default="lora")
    rank: int = doc("LoRA / DoRA rank r.", default=16)
    alpha: float | None = doc("LoRA / DoRA alpha; default 2 x rank.", default=None)
    dropout: float | None = doc("Dropout on the adapter input (lora, dora, adapter).", default=None)
    targets: str | None = doc("Modules to adapt: 'all-linear', 'attn', 'mlp', a comma list of names, or a regex; "
                              "default all-linear for LoRA/DoRA, the method's own otherwise.",
                              default=None)
    use_rslora: bool = doc("Scale by alpha/sqrt(rank) (rank-stabilised LoRA).", default=False)
    init: str | None = doc("Initialisation: LoRA 'default' | 'gaussian' | 'pissa' | 'olora' | 'loftq' "
                           "| 'eva' | 'lora_ga' (eva and lora_ga read --init-batches training "
                           "batches first); prompt 'random' | 'text' | 'sample_vocab'; prefix 'random' | "
                           "'zero' | 'text'.", default=None)
    init_batches: int = doc("eva / lora_ga: training batches (the run's first, at --batch-size) "
                            "the init reads.", default=4)
    init_options: Mapping[str, Any] | None = doc(
        "LoRA init settings, e.g. adapter.init_options.loftq_bits=8: pissa_niter, loftq_bits, "
        "loftq_iterations, eva_rho, lora_ga_gamma.", default=None)
    init_text: str | None = doc("prompt / prefix: the text whose tokens start the virtual tokens "
                                "(with init='text').", default=None)
    num_virtual_tokens: int | None = doc("prompt / prefix: virtual tokens before the input.", default=None)
    prefix_projection: bool | None = doc("prefix: train the prefix through an MLP.", default=None)
    bottleneck_size: int | None = doc("adapter: width of the bottleneck.", default=None)
    placement: str | None = doc("adapter: 'houlsby' (after attention and MLP) or 'pfeiffer' (MLP).",
                                default=None)
    activation: str | None = doc("adapter: 'relu', 'gelu' or 'silu'.", default=None)
    quant_block_size: int = doc("qlora: weights per NF4 block (one absmax each).", default=64)
    double_quant: bool = doc("qlora: store the block absmax values in 8 bits (4.127 instead of "
                             "4.5 bits per weight).", default=True)

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise ConfigError(f"adapter.method={self.method!r}: choose one of {', '.join(TRAIN_METHODS)}")
        positive("adapter.init_batches", self.init_batches)
        if self.init_options is not None and not isinstance(self.init_options, Mapping):
            raise ConfigError(f"adapter.init_options={self.init_options!r}: give a mapping, e.g. "
                              "adapter.init_options.loftq_bits=4")


@dataclass(frozen=True)
class TrainSection:
    lr: float = doc("Peak learning rate (AdamW), reached after warm-up, then cosine decay to 0.",
                    default=2e-4)
    epochs: float = doc("Passes over the data (ignored when steps is set).", default=1.0)
    steps: int | None = doc("Optimizer steps to run; overrides epochs.", default=None)
    batch_size: int = doc("Sequences per micro-batch.", default=8)
    grad_accum: int = doc("Micro-batches per optimizer step.", default=1)
    warmup_ratio: float = doc("Fraction of the steps spent warming the learning rate up.", default=0.05)
    weight_decay: float = doc("AdamW weight decay.", default=0.0)
    max_grad_norm: float = doc("Clip the gradient norm to this (0 disables).", default=1.0)
    grad_checkpointing: bool = doc("Recompute activations in backward to save memory.", default=False)
    seed: int = doc("Seed for init, shuffling and dropout (same seed, same run).", default=0)
    optimizer: str = doc("Optimizer: 'adamw', 'paged_adamw' (state in host memory, paged to the "
                         "device per update) or 'adamw8bit' (8-bit blockwise moment estimates).",
                         default="adamw")
    save_every: int = doc("Write a checkpoint every N steps (0: only at the end).", default=0)
    keep_last: int = doc("Checkpoints to keep.", default=2)
    eval_every: int = doc("Evaluate on eval data every N steps (0: only at the end).", default=0)
    log_every: int = doc("Write a metrics line every N steps.", default=1)
    loss_chunk: int = doc("Tokens per chunk of the output-head loss (bounds logits memory).", default=256)

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr={self.lr!r}: give a positive learning rate (e.g. 2e-4)")
        for name in ("batch_size", "grad_accum", "keep_last", "log_every", "loss_chunk"):
            positive(f"train.{name}", getattr(self, name))
        if self.steps is not None:
            positive("train.steps", self.steps)
        if not self.epochs > 0:
            raise ConfigError(f"train.epochs={self.epochs!r}: give a positive number of passes")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio!r}: give a fraction in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class TrainConfig:
    model: str = doc("Model: a bundled name (smollm2-135m) or a local transformers folder.",
                     default="smollm2-135m")
    output: str = doc("Output folder: the adapter, training.json, metrics and plots.", default="runs/latest")
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        if not self.data.path:
            raise ConfigError("data.path is empty: give the training JSONL with --data FILE")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: give a positive integer")


SECTIONS = {"data": DataSection, "adapter": AdapterSection, "train": TrainSection}


def build_train_config(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from nested dicts (a YAML preset merged with overrides); unknown keys fail."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            kwargs[key] = build_section(key, SECTIONS[key], value or {})
        elif key in ("model", "output"):
            kwargs[key] = value
        else:
            raise ConfigError(f"unknown config key {key!r}; top-level keys are model, output, "
                              f"{', '.join(SECTIONS)}")
    return TrainConfig(**kwargs)


def build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}; {section} has: {', '.join(names)}")
    return cls(**{k: coerce(names[k], v) for k, v in values.items()})


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Strings from the command line become the field's type (int, float, bool)."""
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{f.name}={value!r}: give true or false")
        return value.lower() in ("true", "1", "yes")
    for caster, name in ((int, "int"), (float, "float")):
        if kind.startswith(name):
            try:
                return caster(value)
            except ValueError:
                raise ConfigError(f"{f.name}={value!r}: give a {name}") from None
    return value


def read_preset(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The nested values of a YAML preset (--config); none without a path."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    return yaml.safe_load(path.read_text()) or {}


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `section.key=value` override to nested dicts."""
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` strings from the command line; values read as YAML scalars."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: write it as section.key=value (e.g. train.lr=2e-4)")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
