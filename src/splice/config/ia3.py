"""IA³'s configuration (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"): which modules get a learned scaling vector, on which side."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from splice.config.base import AdapterConfig, ConfigError, as_tuple, check_regex, doc

# Per model family: (modules scaled, the feed-forward ones among them). The defaults are the union
# over families: the names of one family match nothing in the other, so the same config picks
# k/v/down in a Llama and c_attn/mlp.c_proj in a GPT-2.
FAMILY_TARGETS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),  # Mistral, Qwen2, SmolLM2 alike
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}
DEFAULT_TARGETS = tuple(n for targets, _ in FAMILY_TARGETS.values() for n in targets)
DEFAULT_FEEDFORWARD = tuple(n for _, ff in FAMILY_TARGETS.values() for n in ff)


def is_feedforward_path(feedforward: tuple[str, ...] | str, path: str) -> bool:
    """Whether the module at `path` scales its input: a regex must match the whole path; a list
    entry matches when the path ends with it (a plain string suffix: the rule of peft's adapter
    format, so a file selects the same modules wherever it is read)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


def can_overlap(feedforward_name: str, target_name: str) -> bool:
    """Whether some module path both ends with `feedforward_name` and matches the target name
    (equals it or ends with '.target'). Not plain set inclusion: a file that lists its targets by
    full path ('model.layers.0.mlp.down_proj') still names its feed-forward modules by suffix."""
    n, t = feedforward_name, target_name
    return n == t or ("." + t).endswith(n) or n.endswith("." + t)


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """A learned vector l per adapted module, initialised to ones (so the model starts as the base):
    an ordinary module scales its output, y = l ⊙ (W₀x + b); a feed-forward module scales its
    input, y = W₀(l ⊙ x) + b. Both fold exactly into W₀ (row or column scaling)."""

    method: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    peft_key_map: ClassVar[Mapping[str, str]] = {"init_ones": "init_ia3_weights"}

    target_modules: tuple[str, ...] | str | None = doc(
        "Modules to scale: a list of names (a module matches when its dotted path equals a name or "
        "ends with '.name'), a regex matched against the whole path, or 'all-linear'. Default: "
        f"{', '.join(DEFAULT_TARGETS)} (attention keys/values and the MLP output of Llama-family "
        "and GPT-2 models; each family matches only its own names).", default=None)
    feedforward_modules: tuple[str, ...] | str | None = doc(
        "The targets whose input (not output) is scaled, as in the paper's feed-forward rescaling: "
        "a list (a module is feed-forward when its path ends with an entry; each entry must be "
        "among the targets) or a regex matched against the whole path. Default: those of "
        f"{', '.join(DEFAULT_FEEDFORWARD)} among the targets.", default=None)
    fan_in_fan_out: bool = doc("The base weight is stored (in, out) (GPT-2 Conv1D); detected "
                               "automatically on attach, recorded for peft.", default=False)
    init_ones: bool = doc("Start every vector at 1 (the model starts as the base). False leaves "
                          "random N(0, 1) vectors, for tests only.", default=True)

    def __post_init__(self) -> None:
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", DEFAULT_TARGETS)
        super().__post_init__()
        ff = as_tuple(self.feedforward_modules)
        targets = self.target_modules
        if ff is None:
            listed = isinstance(targets, tuple)
            ff = tuple(n for n in DEFAULT_FEEDFORWARD if not listed or n in targets)
        object.__setattr__(self, "feedforward_modules", ff)
        if isinstance(ff, str):
            check_regex("feedforward_modules", ff)
        elif isinstance(targets, tuple):
            stray = [n for n in ff if not any(can_overlap(n, t) for t in targets)]
            if stray:
                raise ConfigError(f"feedforward_modules={list(ff)!r}: {stray!r} can match none of "
                                  f"target_modules={list(targets)!r}; feed-forward modules must be "
                                  "among the targets (add them to target_modules)")
        for name in ("fan_in_fan_out", "init_ones"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: give true or false")

    def is_feedforward(self, module_path: str) -> bool:
        return is_feedforward_path(self.feedforward_modules, module_path)

    # -- peft file boundary -------------------------------------------------------------------
    # Base fields the IA3 file format has no key for: written only when set. A reader that
    # ignores them adapts the other layers too, with vectors of ones (the identity), so the
    # file still gives the same outputs there.
    peft_optional_keys: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["feedforward_modules"] = self.file_feedforward()
        for key in self.peft_optional_keys:
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def file_feedforward(self) -> list[str] | str:
        """feedforward_modules as the file records it. Readers require a list of them to be a
        subset of a list of targets, and the file gives 'all-linear' as the resolved names, so
        unless the list is literally a subset of listed targets it goes as the equivalent regex
        ("ends with n" is `.*n` matched against the whole path)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return ff
        targets = self.target_modules
        if not ff or (isinstance(targets, tuple) and set(ff) <= set(targets)):
            return sorted(ff)
        return ".*(?:" + "|".join(re.escape(n) for n in sorted(ff)) + ")"
