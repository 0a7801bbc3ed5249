"""``modeling_cuttlefish.py``: the custom code that loads a saved folder with ``trust_remote_code=True``.

The file must run where cuttlefish_hf is not installed, so it carries its own factorized layers. They are not a
hand-kept copy: :func:`remote_code` writes the source of ``cuttlefish_hf.layers`` (the layer classes, the
``factorized_like`` builder and what they call, read with ``inspect.getsource``) into the file, so it builds
exactly the layers this version saves. With cuttlefish_hf installed, the file only imports it and its loader does
the work.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..layers import (FactorizedConv2d, FactorizedLayer, FactorizedLinear, dense_matrix, dense_shape, factorized_from,
                      factorized_like, is_conv1d, is_factorizable, is_linear, svd_factors, truncated_svd)
from ..logging_utils import get_logger
from ..stable_rank import check_finite

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = ["REMOTE_CODE_FILE", "auto_class_names", "forget_remote_code", "remote_code", "write_remote_code"]

logger = get_logger(__name__)

REMOTE_CODE_FILE = "modeling_cuttlefish.py"

# The layer classes, the builder, and every function they call, in definition order (test_hub checks that the
# file defines every name it uses).
_LAYER_CODE = (check_finite, is_conv1d, is_linear, is_factorizable, dense_shape, dense_matrix, truncated_svd,
               svd_factors, FactorizedLayer, FactorizedLinear, FactorizedConv2d, factorized_like, factorized_from)

_HEAD = '''\
"""{arch} with Cuttlefish low-rank layers, for ``from_pretrained(..., trust_remote_code=True)``.

Written by cuttlefish_hf {version}. config.json["quantization_config"] records which layers are stored as two
low-rank factors (``<layer>.first``, ``<layer>.second``). With cuttlefish_hf installed this file only imports it
(its loader rebuilds the layers); without it, the layers below (copied from cuttlefish_hf/layers.py) are used.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
import transformers
from torch import nn
from torch.nn.modules.utils import _pair

try:
    import cuttlefish_hf.hub  # registers the loader that factorizes the model while it loads
except ImportError:
    cuttlefish_hf = None
'''

_MODEL = '''

class Cuttlefish{arch}(transformers.{arch}):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = getattr(config, "quantization_config", None)
        if cuttlefish_hf is None and isinstance(record, dict) and record.get("quant_method") == "cuttlefish":
            for name, rank in record["plan"].items():
                dense = self.get_submodule(name)
                layer = factorized_like(dense, rank, extra_bn=record.get("extra_bn", False))
                # Some models' _init_weights read a child's weight by name (GPT-2: c_proj.weight): a stand-in of
                # the dense shape on the meta device, flagged as loaded so transformers' init leaves it alone.
                layer.weight = torch.empty(dense.weight.shape, device="meta")
                layer.weight._is_hf_initialized = True
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, child, layer)
'''


def remote_code(arch: str) -> str:
    """The text of ``modeling_cuttlefish.py`` for the transformers architecture ``arch`` (``"GPT2LMHeadModel"``)."""
    code = "\n\n\n".join(inspect.getsource(obj).rstrip() for obj in _LAYER_CODE)
    return f"{_HEAD.format(arch=arch, version=__version__)}\n\n{code}\n{_MODEL.format(arch=arch)}"


def auto_class_names(model: PreTrainedModel) -> list[str]:
    """The ``AutoModel*`` classes that build exactly this architecture for its ``model_type``."""
    from transformers.models.auto import modeling_auto

    names = []
    for name in dir(modeling_auto):
        # The model-type -> class-name table behind each auto class (reading names imports nothing).
        table = getattr(getattr(getattr(modeling_auto, name), "_model_mapping", None), "_model_mapping", None)
        if not name.startswith("AutoModel") or not isinstance(table, Mapping):
            continue
        target = table.get(model.config.model_type)
        if type(model).__name__ == target or (isinstance(target, (tuple, list)) and type(model).__name__ in target):
            names.append(name)
    return names


def forget_remote_code(config: PreTrainedConfig) -> None:
    """Drop the ``auto_map`` entries that point at ``modeling_cuttlefish.py`` (for a model merged back to dense)."""
    stem = Path(REMOTE_CODE_FILE).stem
    auto_map = getattr(config, "auto_map", None) or {}
    kept = {name: target for name, target in auto_map.items() if not str(target).startswith(f"{stem}.")}
    if kept:
        config.auto_map = kept
    elif auto_map:
        del config.auto_map


def write_remote_code(model: PreTrainedModel, folder: str | Path) -> Path | None:
    """Write ``modeling_cuttlefish.py`` and ``auto_map`` into a saved folder, for ``trust_remote_code=True``.

    The file is self-contained (torch and transformers only), so the folder loads where cuttlefish_hf is not
    installed. Returns its path, or None (with a warning) for an architecture transformers does not export.
    """
    import transformers

    arch = type(model).__name__
    auto_classes = auto_class_names(model)
    if getattr(transformers, arch, None) is not type(model) or not auto_classes:
        logger.warning("No trust_remote_code loader written: %s is not an architecture of an AutoModel class.", arch)
        return None
    try:
        text = remote_code(arch)
    except OSError as error:  # installed without its .py files
        logger.warning("No trust_remote_code loader written: the source of cuttlefish_hf.layers is not available "
                       "(%s).", error)
        return None
    path = Path(folder) / REMOTE_CODE_FILE
    path.write_text(text, encoding="utf-8")
    config_path = Path(folder) / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {name: f"{path.stem}.Cuttlefish{arch}" for name in auto_classes}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
