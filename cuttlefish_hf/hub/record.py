"""The Cuttlefish record: what a saved factorized model says about itself, and which kind of model gets which.

``{"version": cuttlefish_hf version, "plan": {layer: rank}, "extra_bn": bool}``, stored in ``config.json``: under
``"quantization_config"`` (with ``"quant_method": "cuttlefish"``) for transformers, under a top-level
``"cuttlefish"`` key for timm. Nothing here imports transformers: a model is a transformers one only if
transformers' modeling code is already loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from .._version import __version__
from ..layers import FactorizedConv2d
from ..surgery import factorized_plan

__all__ = ["QUANT_METHOD", "TIMM_RECORD_KEY", "WEIGHTS_NAME", "check_plan_format", "cuttlefish_record",
           "is_timm_model", "is_transformers_model"]

QUANT_METHOD = "cuttlefish"
TIMM_RECORD_KEY = "cuttlefish"
WEIGHTS_NAME = "model.safetensors"


def cuttlefish_record(model: nn.Module) -> dict[str, Any]:
    """What ``config.json`` records about a factorized model: ``{"version", "plan", "extra_bn"}``.

    Example:
        >>> cuttlefish_record(nn.Sequential(nn.Linear(4, 4)))["plan"]
        {}
    """
    extra_bn = any(isinstance(m, FactorizedConv2d) and not isinstance(m.middle, nn.Identity) for m in model.modules())
    return {"version": __version__, "plan": factorized_plan(model), "extra_bn": extra_bn}


def check_plan_format(plan: Any, where: str) -> dict[str, int]:
    """``plan`` as a dict if it maps module names to positive int ranks, else a ValueError naming ``where``."""
    if not isinstance(plan, Mapping) or not all(
            isinstance(name, str) and isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
            for name, rank in plan.items()):
        raise ValueError(f"{where}: the Cuttlefish plan must map module names to positive int ranks, got {plan!r}.")
    return dict(plan)


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers to find out)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    pretrained_model = getattr(modeling_utils, "PreTrainedModel", None)
    return pretrained_model is not None and isinstance(model, pretrained_model)


def is_timm_model(model: Any) -> bool:
    """Whether ``model`` is a timm model (it has timm's ``pretrained_cfg``)."""
    return not is_transformers_model(model) and hasattr(model, "pretrained_cfg")
