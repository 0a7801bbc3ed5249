"""Save a factorized transformers or timm model into a folder: weights, record, model card, custom code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .card import write_model_card
from .record import is_timm_model, is_transformers_model
from .remote_code import write_remote_code
from .timm import save_timm

__all__ = ["save_pretrained"]


def save_pretrained(model: nn.Module, folder: str | Path, *, training_notes: str | Mapping | None = None,
                    repo_id: str | None = None, remote_code: bool = True, **kwargs: Any) -> Path:
    """Save a factorized transformers or timm model with its plan, a model card and (transformers) custom code.

    transformers models: :func:`record_plan_`, ``model.save_pretrained(folder, **kwargs)``, then
    ``modeling_cuttlefish.py`` (if ``remote_code``) and README.md. timm models: :func:`save_timm`.

    Example:
        >>> save_pretrained(model, "bert-cuttlefish", training_notes="GLUE SST-2, 3 epochs")  # doctest: +SKIP
    """
    if kwargs.pop("push_to_hub", False):
        raise ValueError("Use cuttlefish_hf.hub.push_to_hub(model, repo_id): it uploads the model card too.")
    if is_timm_model(model):
        return save_timm(model, folder, training_notes=training_notes, repo_id=repo_id, **kwargs)
    if not is_transformers_model(model):
        raise TypeError(f"Expected a transformers PreTrainedModel or a timm model, got {type(model).__name__}.")
    from .transformers_loader import record_plan_

    folder = Path(folder)
    recorded = record_plan_(model) is not None
    model.save_pretrained(folder, **kwargs)
    if remote_code and recorded:
        write_remote_code(model, folder)
    write_model_card(model, folder, training_notes, repo_id=repo_id)
    return folder
