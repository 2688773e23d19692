"""PEFT methods. Importing this package registers every method with the registry."""

from splice.methods import lora  # noqa: F401  (registers "lora")
from splice.methods import ia3  # noqa: F401  (registers "ia3")
from splice.methods import bottleneck  # noqa: F401  (registers "adapter")
from splice.methods import dora  # noqa: F401  (registers "dora")
from splice.methods import prompt  # noqa: F401  (registers "prompt")
from splice.methods import prefix  # noqa: F401  (registers "prefix")
