"""The memory planner: bytes a fine-tuning run needs, from a model's shape (see plan.estimate)."""

from splice.plan.estimate import (METHODS, OPTIMIZERS, MemoryPlan, PlanSettings, lora_parameters,
                                  nf4_bytes, plan_all_methods, plan_memory)
from splice.plan.shapes import (ModelShape, preset_names, shape_from_config, shape_from_model,
                                shape_from_name, shape_from_preset)

__all__ = ["METHODS", "OPTIMIZERS", "MemoryPlan", "ModelShape", "PlanSettings", "lora_parameters",
           "nf4_bytes", "plan_all_methods", "plan_memory", "preset_names", "shape_from_config",
           "shape_from_model", "shape_from_name", "shape_from_preset"]
