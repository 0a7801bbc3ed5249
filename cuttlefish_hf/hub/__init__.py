"""Share factorized models: save, reload, model cards and Hub uploads, for transformers and timm.

A factorized checkpoint is an ordinary ``model.safetensors`` in which each factorized layer is stored as
``<layer>.first.weight`` and ``<layer>.second.weight`` (+ bias, + ``<layer>.middle.*`` for the extra BatchNorm),
plus a record of the plan in ``config.json`` (``record``). transformers: ``AutoModelFor*.from_pretrained(path)``
restores it through the "cuttlefish" quantizer that ``import cuttlefish_hf`` registers (``transformers_loader``,
``registration``), and ``trust_remote_code=True`` through the ``modeling_cuttlefish.py`` saved with it
(``remote_code``) where cuttlefish_hf is not installed. Plain transformers with neither cannot be stopped: it
warns that quantization method "cuttlefish" is unknown and initializes the factorized layers randomly; the model
card (``card``) says so, and every loading path of ours raises instead. timm: ``save_timm`` / ``load_timm``.

Each name below loads its module on first use, so ``import cuttlefish_hf`` imports neither transformers' model
code nor huggingface_hub, and timm users never import transformers' model code.

Example:
    >>> from cuttlefish_hf import hub
    >>> hub.save_pretrained(model, "bert-cuttlefish", training_notes={"task": "SST-2"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module of this package that defines it
_EXPORTS = {
    "CuttlefishCheckpointConfig": "transformers_loader",
    "CuttlefishHfQuantizer": "transformers_loader",
    "from_pretrained": "transformers_loader",
    "record_plan_": "transformers_loader",
    "QUANT_METHOD": "record",
    "TIMM_RECORD_KEY": "record",
    "WEIGHTS_NAME": "record",
    "cuttlefish_record": "record",
    "REMOTE_CODE_FILE": "remote_code",
    "forget_remote_code": "remote_code",
    "write_remote_code": "remote_code",
    "model_card": "card",
    "write_model_card": "card",
    "save_pretrained": "save",
    "push_to_hub": "upload",
    "save_timm": "timm",
    "load_timm": "timm",
}
_REEXPORTS = {"factorization_report": "..surgery", "FactorizationReport": "..surgery"}

__all__ = [  # noqa: RUF022  (grouped like _EXPORTS)
    "CuttlefishCheckpointConfig", "CuttlefishHfQuantizer", "from_pretrained", "record_plan_",
    "QUANT_METHOD", "TIMM_RECORD_KEY", "WEIGHTS_NAME", "cuttlefish_record",
    "REMOTE_CODE_FILE", "forget_remote_code", "write_remote_code",
    "model_card", "write_model_card", "save_pretrained", "push_to_hub", "save_timm", "load_timm",
    "FactorizationReport", "factorization_report",
]

if TYPE_CHECKING:
    from ..surgery import FactorizationReport, factorization_report
    from .card import model_card, write_model_card
    from .record import QUANT_METHOD, TIMM_RECORD_KEY, WEIGHTS_NAME, cuttlefish_record
    from .remote_code import REMOTE_CODE_FILE, forget_remote_code, write_remote_code
    from .save import save_pretrained
    from .timm import load_timm, save_timm
    from .transformers_loader import CuttlefishCheckpointConfig, CuttlefishHfQuantizer, from_pretrained, record_plan_
    from .upload import push_to_hub


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    elif name in _REEXPORTS:
        module = importlib.import_module(_REEXPORTS[name], __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
