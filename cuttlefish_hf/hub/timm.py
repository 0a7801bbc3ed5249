"""timm's Hub layout for factorized models: :func:`save_timm` and :func:`load_timm`.

timm's layout (``timm.models.save_for_hf``: ``config.json`` with ``architecture``, ``model_args`` and
``pretrained_cfg``, plus ``model.safetensors``) with the record under a top-level ``"cuttlefish"`` key. timm
loads checkpoints strictly, so ``timm.create_model(..., pretrained=True)`` fails loudly on factors;
:func:`load_timm` is the call that restores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..serialization import factor_ranks
from ..surgery import factorize_
from .card import write_model_card
from .record import TIMM_RECORD_KEY, WEIGHTS_NAME, check_plan_format, cuttlefish_record

__all__ = ["load_timm", "save_timm"]


def save_timm(model: nn.Module, folder: str | Path, *, training_notes: str | Mapping | None = None,
              repo_id: str | None = None, model_config: Mapping | None = None, **kwargs: Any) -> Path:
    """timm's Hub layout (``timm.models.save_for_hf``, safetensors) with the Cuttlefish record and a model card.

    Reload with :func:`load_timm`. timm's own ``push_to_hf_hub(model, repo_id)`` also uploads a folder that
    :func:`load_timm` restores (it reads the plan from the factor shapes); pass
    ``model_config={"cuttlefish": cuttlefish_record(model)}`` to record the plan there too.
    """
    from timm.models import save_for_hf

    model_config = dict(model_config or {})
    record = cuttlefish_record(model)
    if record["plan"]:
        model_config[TIMM_RECORD_KEY] = record
    save_for_hf(model, str(folder), model_config=model_config, safe_serialization=True, **kwargs)
    write_model_card(model, folder, training_notes, repo_id=repo_id, library_name="timm")
    return Path(folder)


def _timm_folder(name_or_path: str | Path, revision: str | None, cache_dir: str | Path | None) -> Path:
    name = str(name_or_path).removeprefix("local-dir:")
    if Path(name).is_dir():
        return Path(name)
    if name.startswith("hf-hub:") or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import snapshot_download

        repo_id = name.removeprefix("hf-hub:")
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=["config.json", WEIGHTS_NAME]))
    raise FileNotFoundError(f"{name_or_path!s} is neither a folder nor a Hub repository id ('hf-hub:owner/name').")


def load_timm(name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
              **kwargs: Any) -> nn.Module:
    """Rebuild a factorized timm model from a folder or Hub repo saved by :func:`save_timm` / ``push_to_hub``.

    Creates the architecture from config.json (``pretrained=False``), factorizes it with ``init="empty"`` and
    loads ``model.safetensors`` strictly: a plan that does not match the weights or the model raises.

    Example:
        >>> model = load_timm("hf-hub:me/deit-tiny-cuttlefish")  # doctest: +SKIP
    """
    import timm
    from safetensors.torch import load_file

    folder = _timm_folder(name_or_path, revision, cache_dir)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}; save_timm and push_to_hub write one.")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    state_dict = load_file(str(weights))
    saved_plan, saved_extra_bn = factor_ranks({key: tensor.shape for key, tensor in state_dict.items()})
    record = config.get(TIMM_RECORD_KEY)
    plan, extra_bn = saved_plan, saved_extra_bn
    if record is not None:
        plan = check_plan_format(record.get("plan"), f"{folder}/config.json")
        extra_bn = bool(record.get("extra_bn", False))
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, **kwargs)
    try:
        factorize_(model, plan, extra_bn=extra_bn, init="empty")
    except ValueError as error:
        raise ValueError(f"{folder}: the Cuttlefish plan does not fit {config.get('architecture')}: {error}") from error
    if plan != saved_plan:
        only_record = sorted(set(plan) - set(saved_plan))
        only_weights = sorted(set(saved_plan) - set(plan))
        ranks = sorted(n for n in set(plan) & set(saved_plan) if plan[n] != saved_plan[n])
        raise ValueError(f"{folder}: config.json's Cuttlefish plan does not match {WEIGHTS_NAME} (only in "
                         f"config.json: {only_record[:3]}; only in the weights: {only_weights[:3]}; other ranks: "
                         f"{ranks[:3]}).")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
