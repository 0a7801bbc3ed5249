"""Load and record factorized transformers models: the "cuttlefish" quantizer that transformers' loader calls.

transformers 5 builds a model on the meta device and only then reads the checkpoint; the public place where
another package may reshape the module tree in between is its quantizer registry (``register_quantization_config``
and ``register_quantizer``, meant for out-of-tree methods). Importing this module registers ``"cuttlefish"``
there (``import cuttlefish_hf`` arranges that for when transformers loads its registry, see ``registration.py``),
so ``AutoModelFor*.from_pretrained(path)`` factorizes the empty model from the record, checks the record against
the checkpoint, and lets transformers load the factors as usual (dtype, ``device_map``, shards and renamed legacy
keys keep working). Nothing is quantized: the loader does not flag the model as quantized, so it stays trainable
by ``Trainer``, castable with ``.half()`` and compilable. We did not use a weight-conversion rule (it could only
merge the factors into dense weights), nor a patch of ``PreTrainedModel`` loading (private code that any release
may change).

This module may be imported while ``transformers.modeling_utils`` is half-initialized (transformers imports its
quantizer registry from there), so it imports only transformers' quantizer modules at the top.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import __version__
from ..layers import FactorizedLayer, dense_shape
from ..logging_utils import get_logger
from ..serialization import factor_ranks
from ..surgery import factorize_, merge_
from .record import QUANT_METHOD, check_plan_format, cuttlefish_record, is_transformers_model
from .remote_code import forget_remote_code

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["CuttlefishCheckpointConfig", "CuttlefishHfQuantizer", "from_pretrained", "record_plan_", "register"]

logger = get_logger(__name__)

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class CuttlefishCheckpointConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of a factorized checkpoint (the registry's key; nothing is quantized).

    ``plan=None`` is only for ``from_pretrained(..., quantization_config=...)``: read the plan from the checkpoint.

    Example:
        >>> CuttlefishCheckpointConfig(plan={"encoder.layer.0.output.dense": 8}).to_dict()["quant_method"]
        'cuttlefish'
    """

    def __init__(self, plan: Mapping[str, int] | None = None, extra_bn: bool = False, version: str = __version__,
                 **unknown: Any) -> None:
        unknown.pop("quant_method", None)
        if unknown:
            logger.warning("Ignoring unknown Cuttlefish record keys (written by a newer version?): %s", sorted(unknown))
        self.quant_method = QUANT_METHOD
        self.version = version
        self.plan = None if plan is None else check_plan_format(plan, "quantization_config")
        self.extra_bn = bool(extra_bn)


class CuttlefishHfQuantizer(HfQuantizer):
    """Rebuilds the factorized layers while ``from_pretrained`` loads a Cuttlefish checkpoint.

    It overrides ``preprocess_model`` and ``postprocess_model`` instead of their ``_process_*`` halves on purpose:
    the base versions flag the model as quantized, and then ``Trainer`` refuses to train it and ``.half()`` raises.
    Factors are ordinary float weights.
    """

    requires_calibration = False

    def preprocess_model(self, model: PreTrainedModel, dtype=None, checkpoint_files=None, **kwargs) -> None:
        config = self.quantization_config
        source = model.config.name_or_path or type(model).__name__
        saved = _safetensors_shapes(checkpoint_files)
        saved_ranks, saved_extra_bn = factor_ranks(saved) if saved is not None else (None, False)
        if config.plan is None:
            if saved_ranks is None:
                raise ValueError(f"{source}: config.json records no Cuttlefish plan and the checkpoint is not "
                                 "safetensors, so the factorized layers cannot be found.")
            plan, modules = _fit_prefix(model, saved_ranks), dict(model.named_modules())
            unknown = [name for name in plan if name not in modules]
            if unknown:
                raise ValueError(f"{source}: config.json records no Cuttlefish plan, and the checkpoint's factors "
                                 f"(e.g. {unknown[:3]}) do not name modules of {type(model).__name__} (renamed "
                                 "checkpoint keys?). Save the live model with cuttlefish_hf.hub.save_pretrained("
                                 "model, folder), which records the plan.")
            config.plan, config.extra_bn = plan, saved_extra_bn
        elif saved_ranks is not None and sorted(saved_ranks.values()) != sorted(config.plan.values()):
            raise ValueError(
                f"{source}: config.json's Cuttlefish plan does not match the checkpoint's factors, so the record "
                "and the weights come from different models.\n"
                f"  config.json: {len(config.plan)} layers, ranks {_rank_counts(config.plan)}, e.g. "
                f"{_preview(config.plan)}\n"
                f"  checkpoint:  {len(saved_ranks)} layers, ranks {_rank_counts(saved_ranks)}, e.g. "
                f"{_preview(saved_ranks)}\n"
                "Save the live model again with cuttlefish_hf.hub.save_pretrained(model, folder).")
        else:
            config.plan = _fit_prefix(model, config.plan)
        try:
            factorize_(model, config.plan, extra_bn=config.extra_bn, init="empty")
        except ValueError as error:
            raise ValueError(f"{source}: the Cuttlefish plan in config.json does not fit "
                             f"{type(model).__name__}: {error}") from error
        # Between here and postprocess_model transformers runs the model's _init_weights, and some reach into a
        # child's weight by name (GPT-2: module.c_proj.weight; T5: module.wi.weight). Give each factorized layer a
        # stand-in ``weight`` of the dense shape on the meta device, flagged as loaded so no init touches it.
        for module in model.modules():
            if isinstance(module, FactorizedLayer):
                module.weight = torch.empty(_stored_shape(module), device="meta")
                module.weight._is_hf_initialized = True

    def postprocess_model(self, model: PreTrainedModel, **kwargs) -> None:
        for module in model.modules():
            if isinstance(module, FactorizedLayer) and "weight" in vars(module):
                del module.weight  # the stand-in of preprocess_model
        # transformers marks every tensor it loaded from the checkpoint; a factor without the mark was initialized
        # randomly, which must never pass silently.
        not_loaded = [f"{name}.{key}" for name, module in model.named_modules() if isinstance(module, FactorizedLayer)
                      for key, tensor in module.named_parameters() if not getattr(tensor, "_is_hf_initialized", False)]
        if not_loaded:
            raise ValueError(f"{model.config.name_or_path}: the checkpoint has no weights for {len(not_loaded)} "
                             f"factor tensors (e.g. {not_loaded[:3]}), so they would be random. config.json's "
                             "Cuttlefish plan does not match the checkpoint.")
        if self.quantization_config.plan:
            model.config.quantization_config = self.quantization_config
        else:  # a dense checkpoint loaded through cuttlefish_hf.hub.from_pretrained: leave no record behind
            self.remove_quantization_config(model)

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        # save_pretrained calls this before it writes config.json: keep the record in step with the live model
        # (factorized further, or merged back with merge_ since the record was made). Returning no state dict
        # makes save_pretrained use model.state_dict(), as it does for every quantizer.
        record = cuttlefish_record(model)
        if record["plan"]:
            vars(self.quantization_config).update(record)
        else:  # merged back to dense: no record, and no auto_map pointing at our loader (not written this time)
            self.remove_quantization_config(model)
            forget_remote_code(model.config)
        return None, {}

    def _dequantize(self, model: PreTrainedModel, dtype=None) -> PreTrainedModel:
        merge_(model)  # ``model.dequantize()``: fold the factors back into dense layers
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _stored_shape(module: FactorizedLayer) -> tuple[int, ...]:
    """The shape the replaced dense weight was stored with (a Conv1D stores ``(in, out)``)."""
    shape = dense_shape(module)
    return shape[::-1] if getattr(module, "merges_to_conv1d", False) else shape


def _preview(plan: Mapping[str, int], n: int = 3) -> str:
    items = ", ".join(f"{name}: {rank}" for name, rank in list(plan.items())[:n])
    return f"{{{items}{', ...' if len(plan) > n else ''}}}"


def _rank_counts(plan: Mapping[str, int]) -> str:
    """``{rank: number of layers}``, the comparison that survives renamed checkpoint keys."""
    counts = Counter(plan.values())
    return "{" + ", ".join(f"{rank}: {counts[rank]}" for rank in sorted(counts)) + "}"


def _safetensors_shapes(files) -> dict[str, list[int]] | None:
    """Tensor shapes from safetensors headers (nothing is read into memory); None for other formats."""
    if not files or not all(str(file).endswith(".safetensors") for file in files):
        return None
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({key: handle.get_slice(key).get_shape() for key in handle.keys()})
    return shapes


def _fit_prefix(model: nn.Module, plan: dict[str, int]) -> dict[str, int]:
    """Translate a plan saved by a model with a head (``bert.encoder...``) to its base model, or back."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or all(name in modules for name in plan):
        return plan
    for rename in (lambda n: n.removeprefix(f"{prefix}."), lambda n: f"{prefix}.{n}"):
        renamed = {rename(name): rank for name, rank in plan.items()}
        if all(name in modules for name in renamed):
            return renamed
    return plan  # factorize_ names the modules that do not exist


def record_plan_(model: PreTrainedModel) -> CuttlefishCheckpointConfig | None:
    """Record the model's factorization in ``model.config``, so ``model.save_pretrained`` (and Trainer) save it.

    ``factorize_`` and ``merge_`` call it for every transformers model; every save refreshes the record from the
    live model, and drops it once no layer is factorized any more. Returns the record, or None for a model
    without factorized layers.

    Example:
        >>> factorize_(model, plan); model.save_pretrained("out")  # doctest: +SKIP
    """
    if not is_transformers_model(model):
        raise TypeError(f"record_plan_ needs a transformers PreTrainedModel, got {type(model).__name__}; save timm "
                        "models with cuttlefish_hf.hub.save_timm.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not isinstance(quantizer, CuttlefishHfQuantizer):
        raise ValueError(f"The model is quantized with {quantizer.quantization_config.quant_method}; a Cuttlefish "
                         "plan cannot be recorded on top of another quantization method.")
    record = cuttlefish_record(model)
    if not record["plan"]:  # merged back to dense: no record, and no auto_map pointing at our loader
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        forget_remote_code(model.config)
        return None
    config = CuttlefishCheckpointConfig(**record)
    model.config.quantization_config = config
    model.hf_quantizer = CuttlefishHfQuantizer(config, pre_quantized=True)
    return config


def from_pretrained(model_class: Any, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``model_class.from_pretrained`` that also restores factorized checkpoints whose config.json has no record.

    ``model_class`` is a model class or an auto class. A recorded checkpoint loads the same way through
    ``AutoModel*.from_pretrained`` once cuttlefish_hf is imported; this function also reads the plan from the
    checkpoint's factor shapes when config.json lacks it (e.g. saved by ``model.save_pretrained`` without
    :func:`record_plan_`). Any mismatch raises; nothing is initialized randomly.

    Example:
        >>> model = from_pretrained(AutoModelForSequenceClassification, "me/bert-cuttlefish")  # doctest: +SKIP
    """
    from transformers import PreTrainedConfig

    if kwargs.get("quantization_config") is None:
        config = kwargs.get("config")
        if isinstance(config, PreTrainedConfig):
            recorded = getattr(config, "quantization_config", None) is not None
        else:
            download = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(config or pretrained_model_name_or_path, **download)
            recorded = config_dict.get("quantization_config") is not None
        if not recorded:
            kwargs["quantization_config"] = CuttlefishCheckpointConfig(plan=None)
    return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


def register() -> None:
    """Register ``"cuttlefish"`` in transformers' quantizer registry (done when this module is imported)."""
    for register_class, cls in ((register_quantization_config, CuttlefishCheckpointConfig),
                                (register_quantizer, CuttlefishHfQuantizer)):
        try:
            register_class(QUANT_METHOD)(cls)
        except ValueError:  # registered by an earlier import of this module (importlib.reload)
            pass


register()
