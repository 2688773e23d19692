"""Typed, frozen adapter configurations. No torch import here: configs are plain data."""

from splice.config.base import AdapterConfig, ConfigError, help_for
from splice.config.lora import LoRAConfig

__all__ = ["AdapterConfig", "ConfigError", "LoRAConfig", "help_for"]
