"""A sweep's search space: the YAML file, read and checked into typed, frozen dataclasses.

    sampler: tpe            # tpe | random | grid
    seed: 0
    pruner: median          # median | none
    startup_trials: 4       # trials that always finish before pruning starts
    eval_every: 10          # steps between the intermediate eval losses pruning reads
    intruders: true         # count the intruder dimensions of each complete trial's adapter
    space:
      method: [lora, dora]                      # a list: one of these values
      rank: [4, 8, 16]
      alpha_ratio: [1, 2]                       # alpha = alpha_ratio x rank
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (tpe and random only)
      targets: [attn, mlp, all-linear]
      init: [default, gaussian]
      rslora: [false, true]

A single value fixes a knob. Every knob and value is checked here, before the first trial, and an
error names the offender and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from splice.config.base import TARGET_PRESETS, ConfigError
from splice.config import lora as lora_config

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
SWEEP_METHODS = ("lora", "dora", "qlora")
TARGETS = ("all-linear", *TARGET_PRESETS)


@dataclass(frozen=True)
class KnobSpec:
    """One knob a space file may name: where it lands in the training config and its values."""

    name: str
    key: str  # dotted TrainConfig key ('' for alpha_ratio, which becomes adapter.alpha)
    help: str
    kind: type  # int, float, bool or str
    allowed: Callable[[], tuple] | None = None  # read when checked: the lists can grow
    check: Callable[[Any], bool] = lambda value: True
    rule: str = ""  # what `check` wants, for the error


def _positive(value: Any) -> bool:
    return math.isfinite(value) and value > 0


KNOBS: dict[str, KnobSpec] = {k.name: k for k in (
    KnobSpec("method", "adapter.method", "what trains: lora, dora or qlora (LoRA on an NF4 base)",
             str, lambda: SWEEP_METHODS),
    KnobSpec("rank", "adapter.rank", "LoRA / DoRA rank r", int, check=lambda v: v >= 1,
             rule="a positive integer"),
    KnobSpec("alpha", "adapter.alpha", "LoRA alpha (the update is scaled by alpha/rank)", float,
             check=_positive, rule="a positive number"),
    KnobSpec("alpha_ratio", "", "alpha as a multiple of the rank: alpha = alpha_ratio x rank",
             float, check=_positive, rule="a positive number"),
    KnobSpec("targets", "adapter.targets", "which linear layers get adapters", str,
             lambda: TARGETS),
    KnobSpec("lr", "train.lr", "peak learning rate", float, check=_positive,
             rule="a positive number"),
    KnobSpec("init", "adapter.init", "LoRA initialisation", str,
             lambda: tuple(lora_config.LORA_INITS)),
    KnobSpec("rslora", "adapter.use_rslora", "scale by alpha/sqrt(rank) (rank-stabilised LoRA)",
             bool, lambda: (False, True)),
    KnobSpec("dropout", "adapter.dropout", "dropout on the adapter input", float,
             check=lambda v: 0 <= v < 1, rule="a probability in [0, 1)"),
)}


@dataclass(frozen=True)
class Knob:
    """A knob's search domain: a list of `choices`, or a range [low, high] (log-uniform with
    `log`) when `choices` is None."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def spec(self) -> KnobSpec:
        return KNOBS[self.name]


@dataclass(frozen=True)
class SweepSpace:
    knobs: tuple[Knob, ...]
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    startup_trials: int = 4
    eval_every: int = 10
    intruders: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: {self.sampler!r} is not a sampler; choose one of "
                              f"{', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner: {self.pruner!r} is not a pruner; choose one of "
                              f"{', '.join(PRUNERS)}")
        _check_int("seed", self.seed, None)
        _check_int("startup_trials", self.startup_trials, 0)
        _check_int("eval_every", self.eval_every, 1)
        if not isinstance(self.intruders, bool):
            raise ConfigError(f"intruders: {self.intruders!r}: give true or false")
        names = {k.name for k in self.knobs}
        if {"alpha", "alpha_ratio"} <= names:
            raise ConfigError("space: give alpha or alpha_ratio (alpha as a multiple of rank), "
                              "not both")
        if self.sampler == "grid":
            ranges = [k.name for k in self.knobs if k.choices is None]
            if ranges:
                raise ConfigError(f"space: the grid sampler needs a list of values for "
                                  f"{', '.join(ranges)}, not a range; list the values or use "
                                  "sampler: tpe")

    def grid(self) -> dict[str, list]:
        """Every knob's values, for the grid sampler."""
        return {k.name: list(k.choices) for k in self.knobs if k.choices is not None}

    def grid_size(self) -> int:
        return math.prod(len(k.choices) for k in self.knobs if k.choices is not None)


TOP_LEVEL = ("sampler", "seed", "pruner", "startup_trials", "eval_every", "intruders", "space")


def load_space(path: str | Path) -> SweepSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return parse_space(data or {}, source=str(path))


def parse_space(data: Mapping[str, Any], source: str = "the space file") -> SweepSpace:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'space' section")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {key!r}{_did_you_mean(key, TOP_LEVEL)}; "
                              f"allowed keys: {', '.join(TOP_LEVEL)}")
    space = data.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{source}: a 'space' section naming at least one knob is required; "
                          f"knobs: {', '.join(KNOBS)}")
    knobs = tuple(parse_knob(str(name), value, source) for name, value in space.items())
    settings = {k: v for k, v in data.items() if k != "space"}
    return SweepSpace(knobs, **settings)


def parse_knob(name: str, value: Any, source: str) -> Knob:
    if name not in KNOBS:
        raise ConfigError(f"{source}: unknown knob {name!r}{_did_you_mean(name, KNOBS)}; "
                          f"knobs: {', '.join(KNOBS)}")
    spec = KNOBS[name]
    if isinstance(value, Mapping):
        return parse_range(spec, value, source)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{source}: space.{name} is an empty list; give at least one value")
    return Knob(name, choices=tuple(check_value(spec, v, source) for v in values))


def parse_range(spec: KnobSpec, value: Mapping[str, Any], source: str) -> Knob:
    where = f"{source}: space.{spec.name}"
    if spec.kind not in (int, float):
        raise ConfigError(f"{where} takes a list of values, not a range; allowed: "
                          f"{', '.join(map(str, spec.allowed()))}")
    extra = set(value) - {"low", "high", "log"}
    if extra or not {"low", "high"} <= set(value):
        raise ConfigError(f"{where}: a range is {{low: L, high: H, log: true|false}}; "
                          f"got keys {', '.join(map(str, value))}")
    low, high = (check_value(spec, value[k], source) for k in ("low", "high"))
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log: {log!r}: give true or false")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0")
    return Knob(spec.name, low=low, high=high, log=log)


def check_value(spec: KnobSpec, value: Any, source: str) -> Any:
    where = f"{source}: space.{spec.name}"
    if spec.allowed is not None:
        allowed = spec.allowed()
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(f"{where}: unknown value {value!r}"
                              f"{_did_you_mean(str(value), [str(a) for a in allowed])}; "
                              f"allowed: {', '.join(_show(a) for a in allowed)}")
        return value
    if isinstance(value, str):  # YAML reads 1e-4 (no '.0') as a string
        value = _number(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind is int and not (numeric and float(value).is_integer()):
        raise ConfigError(f"{where}: {value!r} is not {spec.rule}")
    if not numeric or not spec.check(value):
        raise ConfigError(f"{where}: {value!r} is not {spec.rule}")
    return spec.kind(value)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(f"{name}: {value!r}: give an integer" +
                          (f" >= {minimum}" if minimum is not None else ""))


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
