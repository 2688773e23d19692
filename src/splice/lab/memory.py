"""The Memory panel: full fine-tuning vs LoRA vs QLoRA, from the memory planner (`splice.plan`).

The bars stack weights (frozen + trainable), gradients, optimizer state and activations; the
planner's `total` is the peak of one step, which is less than that sum (gradients and
activations peak at different moments), and the page marks it on each bar.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from splice.config.base import ConfigError
from splice.plan import OPTIMIZERS, MemoryPlan, ModelShape, plan_all_methods, shape_from_model
from splice.plan.shapes import shape_from_preset

LOADED = "loaded"
PRESETS = ("1B", "7B", "13B", "65B")  # LLaMA sizes, as the planner's "llama" family has them
PARTS = ("weights", "gradients", "optimizer", "activations")
TARGETS = ("all-linear", "q_proj,v_proj")
DTYPES = ("bf16", "fp32")


class MemoryPanel:
    """Plans for the loaded model's shape (when it is llama-style) or a LLaMA preset."""

    def __init__(self, model: nn.Module, name: str = "loaded model") -> None:
        """`model` must carry no adapters (the planner checks its parameter count)."""
        try:
            self.loaded: ModelShape | None = shape_from_model(model, name)
            self.why_not_loaded = ""
        except (ConfigError, AttributeError) as err:
            self.loaded, self.why_not_loaded = None, str(err)

    def options(self) -> dict[str, Any]:
        models = [{"value": LOADED, "label": f"{self.loaded.name} (loaded)"}] if self.loaded else []
        models += [{"value": size, "label": f"LLaMA {size}"} for size in PRESETS]
        return {"models": models, "targets": list(TARGETS), "dtypes": list(DTYPES),
                "optimizers": list(OPTIMIZERS), "why_not_loaded": self.why_not_loaded}

    def shape(self, model: str) -> ModelShape:
        if model == LOADED:
            if self.loaded is None:
                raise ConfigError(f"the loaded model cannot be planned: {self.why_not_loaded}")
            return self.loaded
        if model not in PRESETS:
            raise ConfigError(f"model={model!r}: choose {LOADED!r} or one of {', '.join(PRESETS)}")
        return shape_from_preset(model, "llama")

    def plan(self, query: dict[str, str]) -> dict[str, Any]:
        """The three methods' plans for the page's settings (query strings, as the page sends)."""
        shape = self.shape(query.get("model", LOADED if self.loaded else PRESETS[1]))
        settings = {"rank": _integer(query, "rank", 8), "batch": _integer(query, "batch", 1),
                    "seq": _integer(query, "seq", 512), "targets": query.get("targets", TARGETS[0]),
                    "dtype": query.get("dtype", DTYPES[0]),
                    "optimizer": query.get("optimizer", OPTIMIZERS[0]),
                    "grad_checkpointing": query.get("grad_checkpointing", "false") == "true"}
        plans = plan_all_methods(shape, **settings)
        return {"model": shape.name, "params": shape.params, "settings": settings,
                "parts": list(PARTS), "methods": [plan_row(p) for p in plans]}


def plan_row(plan: MemoryPlan) -> dict[str, Any]:
    parts = {"weights": plan.frozen_weights + plan.trainable_weights, "gradients": plan.gradients,
             "optimizer": plan.optimizer_state, "activations": plan.activations}
    return {"method": plan.settings.method, "parts": parts, "sum": plan.sum_of_parts,
            "total": plan.total, "peak_phase": plan.peak_phase,
            "trainable_params": plan.trainable_params,
            "host_optimizer_state": plan.host_optimizer_state}


def _integer(query: dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: give a whole number") from None
