"""PEFT methods. Importing this package registers every method with the registry."""

from splice.methods import lora  # noqa: F401  (registers "lora")
