"""splice: parameter-efficient fine-tuning for PyTorch models.

    model, tokenizer = splice.load_model("smollm2-135m")
    splice.attach(model, splice.LoRAConfig(rank=8, target_modules="all-linear"))
    ... train ...
    splice.save_adapter(model, "my-adapter")      # loads in peft too
"""

from splice import methods as _methods  # noqa: F401  (registers every method)
from splice.config import AdapterConfig, ConfigError, LoRAConfig
from splice.config.bottleneck import BottleneckConfig
from splice.config.dora import DoRAConfig
from splice.config.ia3 import IA3Config
from splice.config.prefix import PrefixTuningConfig
from splice.config.prompt import PromptTuningConfig
from splice.core.accounting import TrainableCount, count_trainable
from splice.core.attach import (active_adapters, attach, delete_adapter, disable_adapters,
                                list_adapters, set_active_adapters)
from splice.core.errors import AdapterError, AdapterFileError, SpliceError, TargetError
from splice.core.io import load_adapter, save_adapter
from splice.core.merging import merge_adapter, merge_and_unload, unmerge_adapter
from splice.core.registry import method_table
from splice.models import load_model

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterError", "AdapterFileError", "ConfigError", "LoRAConfig",
    "BottleneckConfig", "DoRAConfig", "IA3Config",
    "PrefixTuningConfig", "PromptTuningConfig",
    "SpliceError", "TargetError", "TrainableCount", "active_adapters", "attach", "count_trainable",
    "delete_adapter", "disable_adapters", "list_adapters", "load_adapter", "load_model",
    "merge_adapter", "merge_and_unload", "method_table", "save_adapter", "set_active_adapters",
    "unmerge_adapter",
]

from splice.library import AdapterLibrary  # noqa: E402

__all__ += ["AdapterLibrary"]

from splice.merge.compose_model import compose_adapters  # noqa: E402

__all__ += ["compose_adapters"]

from splice.core.attach import BASE_ADAPTER  # noqa: E402
from splice.core.routing import adapter_routing, forward_mixed  # noqa: E402

__all__ += ["BASE_ADAPTER", "adapter_routing", "forward_mixed"]

from splice.methods.lora_hotswap import hotswap_adapter  # noqa: E402

__all__ += ["hotswap_adapter"]
