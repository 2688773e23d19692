"""The fields every adapter config shares, validation helpers and peft-file translation."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

TargetSpec = "tuple[str, ...] | str | None"


class ConfigError(ValueError):
    """An adapter config field holds an invalid value; the message names the field and the fix."""


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds both the docstring tables and the CLI help."""
    return field(metadata={"help": text}, **kwargs)


def help_for(config_cls: type, name: str) -> str:
    """The help text of one config field (used by the CLI so flags and docs say the same thing)."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def as_tuple(value: Any) -> tuple | None:
    """Lists from JSON or the CLI become tuples so frozen configs stay hashable."""
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


# Named target sets ('all-linear' aside), as regexes over module paths so adapter files record
# them in a form peft reads. They know the linear-layer names of the Llama, GPT-2 and BERT
# families: attn = the attention projections, mlp = the feed-forward ones.
TARGET_PRESETS = {
    "attn": r".*\.(self_attn|attn|attention)\.(.*\.)?"
            r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj|query|key|value|dense|out_proj)",
    "mlp": r".*\.(mlp\.(.*\.)?(gate_proj|up_proj|down_proj|c_fc|c_proj|fc1|fc2)"
           r"|(intermediate|\d+\.output)\.dense)",
}


def parse_targets(text: str) -> tuple[str, ...] | str:
    """A --targets value: 'all-linear', a preset of TARGET_PRESETS ('attn', 'mlp'), a regex (has
    regex syntax), or a comma list of names."""
    if text in TARGET_PRESETS:
        return TARGET_PRESETS[text]
    if text == "all-linear" or re.search(r"[\\^$*+?()\[\]|]", text):
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{field_name}={pattern!r} is not a valid regular expression ({err}); "
                          "pass a list of module names or a valid regex") from None


@dataclass(frozen=True)
class AdapterConfig:
    """Where an adapter goes: the fields shared by every method that wraps modules."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None

    target_modules: tuple[str, ...] | str | None = doc(
        "Modules to adapt: a list of names (a module matches when its dotted path equals a name or "
        "ends with '.name'), a regex matched against the whole path, or 'all-linear' (every linear "
        "layer but the output head).", default=None)
    layers_to_transform: tuple[int, ...] | None = doc(
        "Adapt only these layer indices (the number after 'layers.' / 'h.' in the module path).",
        default=None)
    layers_pattern: tuple[str, ...] | None = doc(
        "Name of the layer list used to read layer indices (e.g. 'layers', 'h'); default: any.",
        default=None)
    modules_to_save: tuple[str, ...] | None = doc(
        "Modules trained in full and saved with the adapter (e.g. a new classifier head).",
        default=None)

    def __post_init__(self) -> None:
        for name in ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        if isinstance(self.layers_pattern, str):
            object.__setattr__(self, "layers_pattern", (self.layers_pattern,))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            check_regex("target_modules", self.target_modules)
        if self.layers_to_transform is not None:
            if any(not isinstance(i, int) or i < 0 for i in self.layers_to_transform):
                raise ConfigError(f"layers_to_transform={self.layers_to_transform!r}: "
                                  "give non-negative integer layer indices")

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    # -- peft file boundary -------------------------------------------------------------------
    peft_key_map: ClassVar[Mapping[str, str]] = {}

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, with peft's key names."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = sorted(value) if f.name == "target_modules" else list(value)
            out[self.peft_key_map.get(f.name, f.name)] = value
        return out

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
        """Build a config from adapter_config.json; unknown keys warn and are ignored."""
        inverse = {v: k for k, v in cls.peft_key_map.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            name = inverse.get(key, key)
            if name in names:
                kwargs[name] = value
            elif key not in cls.ignored_peft_keys and value not in (None, False, {}, [], ""):
                unknown.append(key)
        if unknown:
            warnings.warn(f"adapter config: ignoring keys splice does not use: {sorted(unknown)}",
                          stacklevel=3)
        return cls(**cls.adapt_peft_values(kwargs))

    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset({
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
        "auto_mapping", "peft_version", "megatron_core", "library_name"})

    @classmethod
    def adapt_peft_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Hook for a method to translate peft's value conventions to its own."""
        return kwargs
