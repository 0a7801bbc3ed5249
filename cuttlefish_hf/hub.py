"""Share factorized models: save, reload, model cards and Hub uploads, for transformers and timm.

A factorized checkpoint is an ordinary ``model.safetensors`` in which each factorized layer is stored as
``<layer>.first.weight`` and ``<layer>.second.weight`` (+ bias, + ``<layer>.middle.*`` for the extra BatchNorm),
plus a record in ``config.json``: ``{"version": cuttlefish_hf version, "plan": {layer: rank}, "extra_bn": bool}``.

**transformers.** The record is ``config.json["quantization_config"]`` with ``"quant_method": "cuttlefish"``.
transformers 5 builds a model on the meta device and only then reads the checkpoint; the public place where
another package may reshape the module tree in between is its quantizer registry (``register_quantization_config``
and ``register_quantizer``, meant for out-of-tree methods). Importing this module registers ``"cuttlefish"``
there, so ``AutoModelFor*.from_pretrained(path)`` factorizes the empty model from the record, checks the record
against the checkpoint, and lets transformers load the factors as usual (dtype, ``device_map``, shards and renamed
legacy keys keep working). Nothing is quantized: the loader does not flag the model as quantized, so it stays
trainable by ``Trainer``, castable with ``.half()`` and compilable. We did not use a weight-conversion rule (it
could only merge the factors into dense weights), nor a patch of ``PreTrainedModel`` loading (private code that
any release may change); custom code (``auto_map``) is written as well, as the way to load the folder *without*
cuttlefish_hf: ``from_pretrained(path, trust_remote_code=True)``.

Plain transformers with neither cannot be stopped from the saved folder: it warns that quantization method
"cuttlefish" is unknown, builds dense layers, initializes them randomly and logs a LOAD REPORT of missing keys.
The model card says so; every loading path of ours raises instead of initializing anything.

**timm.** timm's Hub layout (``timm.models.save_for_hf``: ``config.json`` with ``architecture``, ``model_args``
and ``pretrained_cfg``, plus ``model.safetensors``) with the record under a top-level ``"cuttlefish"`` key. timm
loads checkpoints strictly, so ``timm.create_model(..., pretrained=True)`` fails loudly on factors;
:func:`load_timm` is the call that restores them.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import __version__
from .layers import FactorizedConv2d, FactorizedLayer, dense_shape
from .logging_utils import get_logger
from .serialization import factor_ranks
from .surgery import (FactorizationReport, factorization_report, factorize_, factorized_plan, merge_,
                      register_plan_recorder)

__all__ = [
    "CuttlefishCheckpointConfig",
    "CuttlefishHfQuantizer",
    "cuttlefish_record",
    "record_plan_",
    "from_pretrained",
    "save_pretrained",
    "write_remote_code",
    "factorization_report",
    "model_card",
    "write_model_card",
    "push_to_hub",
    "save_timm",
    "load_timm",
]

logger = get_logger(__name__)

QUANT_METHOD = "cuttlefish"
TIMM_RECORD_KEY = "cuttlefish"
REMOTE_CODE_FILE = "modeling_cuttlefish.py"
WEIGHTS_NAME = "model.safetensors"
_CARD_START, _CARD_END = "<!-- cuttlefish:start -->", "<!-- cuttlefish:end -->"
_NO_REPO_ID = "path/to/folder-or-repo-id"
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


# -- the record -----------------------------------------------------------------------------------------------
def cuttlefish_record(model: nn.Module) -> dict[str, Any]:
    """What ``config.json`` records about a factorized model: ``{"version", "plan", "extra_bn"}``."""
    extra_bn = any(isinstance(m, FactorizedConv2d) and not isinstance(m.middle, nn.Identity) for m in model.modules())
    return {"version": __version__, "plan": factorized_plan(model), "extra_bn": extra_bn}


def _check_plan_format(plan: Any, where: str) -> dict[str, int]:
    if not isinstance(plan, Mapping) or not all(
            isinstance(name, str) and isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
            for name, rank in plan.items()):
        raise ValueError(f"{where}: the Cuttlefish plan must map module names to positive int ranks, got {plan!r}.")
    return dict(plan)


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
        self.plan = None if plan is None else _check_plan_format(plan, "quantization_config")
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


for _register, _cls in ((register_quantization_config, CuttlefishCheckpointConfig),
                        (register_quantizer, CuttlefishHfQuantizer)):
    try:
        _register(QUANT_METHOD)(_cls)
    except ValueError:  # registered by an earlier import of this module (importlib.reload)
        pass


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
    if not isinstance(model, PreTrainedModel):
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


def _record_if_transformers(model: nn.Module) -> None:
    if isinstance(model, PreTrainedModel):
        record_plan_(model)


register_plan_recorder(_record_if_transformers)


# -- transformers: load and save ------------------------------------------------------------------------------
def from_pretrained(model_class: Any, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``model_class.from_pretrained`` that also restores factorized checkpoints whose config.json has no record.

    ``model_class`` is a model class or an auto class. A recorded checkpoint loads the same way through
    ``AutoModel*.from_pretrained`` once cuttlefish_hf is imported; this function also reads the plan from the
    checkpoint's factor shapes when config.json lacks it (e.g. saved by ``model.save_pretrained`` without
    :func:`record_plan_`). Any mismatch raises; nothing is initialized randomly.

    Example:
        >>> model = from_pretrained(AutoModelForSequenceClassification, "me/bert-cuttlefish")  # doctest: +SKIP
    """
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


def _auto_class_names(model: PreTrainedModel) -> list[str]:
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


_REMOTE_CODE = '''\
"""{arch} with Cuttlefish low-rank layers, for ``from_pretrained(..., trust_remote_code=True)``.

Written by cuttlefish_hf {version}. config.json["quantization_config"] records which layers are stored as two
low-rank factors (``<layer>.first``, ``<layer>.second``). With cuttlefish_hf installed this file only imports it
(its loader rebuilds the layers); without it, the lines below rebuild them.
"""

import torch
import transformers
from torch import nn

try:
    import cuttlefish_hf.hub  # noqa: F401  (registers the loader that factorizes the model while it loads)
except ImportError:
    cuttlefish_hf = None


class Factorized(nn.Module):
    """``second(middle(first(x)))``: the low-rank replacement of a Linear or Conv2d."""

    def __init__(self, dense, rank, extra_bn):
        super().__init__()
        kwargs = dict(device=dense.weight.device, dtype=dense.weight.dtype)
        if not isinstance(dense, nn.Conv2d):  # nn.Linear, or transformers' Conv1D (GPT-2: nf outputs, nx inputs)
            conv1d = hasattr(dense, "nf")
            out_features = dense.nf if conv1d else dense.out_features
            in_features = dense.nx if conv1d else dense.in_features
            self.first = nn.Linear(in_features, rank, bias=False, **kwargs)
            self.middle = nn.Identity()
            self.second = nn.Linear(rank, out_features, bias=dense.bias is not None, **kwargs)
        else:
            self.first = nn.Conv2d(dense.in_channels, rank, dense.kernel_size, stride=dense.stride,
                                   padding=dense.padding, dilation=dense.dilation, bias=False,
                                   padding_mode=dense.padding_mode, **kwargs)
            self.middle = nn.BatchNorm2d(rank, **kwargs) if extra_bn else nn.Identity()
            self.second = nn.Conv2d(rank, dense.out_channels, 1, bias=dense.bias is not None, **kwargs)
        # Some models' _init_weights read a child's weight by name (GPT-2: c_proj.weight): a stand-in of the dense
        # shape on the meta device, flagged as loaded so transformers' init leaves it alone.
        self.weight = torch.empty(dense.weight.shape, device="meta")
        self.weight._is_hf_initialized = True

    def forward(self, x):
        return self.second(self.middle(self.first(x)))


class Cuttlefish{arch}(transformers.{arch}):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = getattr(config, "quantization_config", None)
        if cuttlefish_hf is None and isinstance(record, dict) and record.get("quant_method") == "cuttlefish":
            for name, rank in record["plan"].items():
                parent, _, child = name.rpartition(".")
                layer = Factorized(self.get_submodule(name), rank, record.get("extra_bn", False))
                setattr(self.get_submodule(parent) if parent else self, child, layer)
'''


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
    auto_classes = _auto_class_names(model)
    if getattr(transformers, arch, None) is not type(model) or not auto_classes:
        logger.warning("No trust_remote_code loader written: %s is not an architecture of an AutoModel class.", arch)
        return None
    path = Path(folder) / REMOTE_CODE_FILE
    path.write_text(_REMOTE_CODE.format(arch=arch, version=__version__), encoding="utf-8")
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {name: f"{path.stem}.Cuttlefish{arch}" for name in auto_classes}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _is_timm_model(model: nn.Module) -> bool:
    return not isinstance(model, PreTrainedModel) and hasattr(model, "pretrained_cfg")


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
    if _is_timm_model(model):
        return save_timm(model, folder, training_notes=training_notes, repo_id=repo_id, **kwargs)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers PreTrainedModel or a timm model, got {type(model).__name__}.")
    folder = Path(folder)
    recorded = record_plan_(model) is not None
    model.save_pretrained(folder, **kwargs)
    if remote_code and recorded:
        write_remote_code(model, folder)
    write_model_card(model, folder, training_notes, repo_id=repo_id)
    return folder


# -- model card -----------------------------------------------------------------------------------------------
def _notes_markdown(training_notes: str | Mapping | None) -> str:
    if training_notes is None:
        return "Not recorded."
    if isinstance(training_notes, Mapping):
        return "\n".join(f"- **{key}**: {value}" for key, value in training_notes.items())
    return str(training_notes).strip()


def _table(report: FactorizationReport) -> str:
    show_srank = any(layer.stable_rank is not None for layer in report.layers)
    head = ["layer", "shape", *(["stable rank"] if show_srank else []), "rank", "params (dense)", "params (factorized)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for layer in report.layers:
        srank = [] if not show_srank else ["" if layer.stable_rank is None else f"{layer.stable_rank:.1f}"]
        cells = [f"`{layer.name}`", "x".join(map(str, layer.shape)), *srank, str(layer.rank),
                 f"{layer.params_before:,}", f"{layer.params_after:,}"]
        rows.append("| " + " | ".join(cells) + " |")
    total = ["**total**", "", *([""] if show_srank else []), "",
             f"**{report.target_params_before:,}**", f"**{report.target_params_after:,}**"]
    rows.append("| " + " | ".join(total) + " |")
    return "\n".join(rows)


def _load_snippet(source: Any, repo_id: str, library_name: str) -> str:
    if library_name == "timm":
        return ("```python\nfrom cuttlefish_hf.hub import load_timm\n\n"
                f'model = load_timm("hf-hub:{repo_id}")\n```\n\n'
                f'`timm.create_model("hf-hub:{repo_id}", pretrained=True)` fails: timm cannot rebuild the '
                "factorized layers by itself.")
    autos = _auto_class_names(source) if isinstance(source, PreTrainedModel) else []
    auto = autos[0] if autos else "AutoModel"
    return ("```python\nimport cuttlefish_hf  # registers the loader of factorized checkpoints\n"
            f"from transformers import {auto}\n\n"
            f'model = {auto}.from_pretrained("{repo_id}")\n```\n\n'
            f'Without cuttlefish_hf: `{auto}.from_pretrained("{repo_id}", trust_remote_code=True)` runs the '
            f"`{REMOTE_CODE_FILE}` of this repository. With neither, transformers only warns that quantization "
            'method "cuttlefish" is unknown and initializes the factorized layers randomly.')


def _card_section(source: Any, training_notes: str | Mapping | None, repo_id: str, library_name: str) -> str:
    report = source if isinstance(source, FactorizationReport) else factorization_report(source)
    ratio = report.model_params_before / max(report.model_params_after, 1)
    return "\n".join([
        _CARD_START,
        "## Cuttlefish low-rank factorization",
        "",
        f"Made with `cuttlefish_hf` {__version__} ([Cuttlefish](https://arxiv.org/abs/2305.02538) low-rank "
        f"training): {len(report.layers)} layers are stored as two low-rank factors, `first` (rank x in) and "
        "`second` (out x rank).",
        "",
        _table(report),
        "",
        f"Factorized layers: {report.target_params_before:,} -> {report.target_params_after:,} parameters. "
        f"Whole model: {report.model_params_before:,} -> {report.model_params_after:,} parameters "
        f"({ratio:.2f}x smaller).",
        "",
        "### How it was trained",
        "",
        _notes_markdown(training_notes),
        "",
        "### How to load",
        "",
        _load_snippet(source, repo_id, library_name),
        _CARD_END,
    ])


def model_card(source: nn.Module | FactorizationReport, training_notes: str | Mapping | None = None, *,
               repo_id: str | None = None, library_name: str | None = None) -> str:
    """A model card (README.md text) with the factorization table, totals, training notes and loading code.

    ``source`` is the factorized model, or a :class:`FactorizationReport` (e.g. ``controller.report``, which also
    has the stable ranks). ``training_notes`` is markdown or a ``{name: value}`` mapping.

    Example:
        >>> print(model_card(model, {"task": "SST-2", "epochs": 3}, repo_id="me/bert-cuttlefish"))  # doctest: +SKIP
    """
    library_name = library_name or ("timm" if _is_timm_model(source) else "transformers")
    tags = ["cuttlefish", "low-rank"] + (["image-classification", "timm"] if library_name == "timm" else [])
    data = ModelCardData(library_name=library_name, tags=tags)
    title = repo_id.rsplit("/", 1)[-1] if repo_id else "Cuttlefish low-rank model"
    body = _card_section(source, training_notes, repo_id or _NO_REPO_ID, library_name)
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n"


def write_model_card(source: nn.Module | FactorizationReport, folder: str | Path,
                     training_notes: str | Mapping | None = None, *, repo_id: str | None = None,
                     library_name: str | None = None) -> Path:
    """Write README.md into ``folder``; an existing card (e.g. ``Trainer.create_model_card``'s) keeps its text and
    gets the Cuttlefish section added, or replaced if it has one."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        path.write_text(model_card(source, training_notes, repo_id=repo_id, library_name=library_name),
                        encoding="utf-8")
        return path
    card = ModelCard.load(path)
    library_name = library_name or card.data.library_name or ("timm" if _is_timm_model(source) else "transformers")
    section = _card_section(source, training_notes, repo_id or _NO_REPO_ID, library_name)
    text = card.text
    if _CARD_START in text and _CARD_END in text:
        start, end = text.index(_CARD_START), text.index(_CARD_END) + len(_CARD_END)
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), "cuttlefish", "low-rank"]))
    card.save(path)
    return path


# -- Hub ------------------------------------------------------------------------------------------------------
def push_to_hub(model: nn.Module, repo_id: str, *, training_notes: str | Mapping | None = None,
                commit_message: str = "Upload Cuttlefish low-rank model", private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                remote_code: bool = True):
    """Save with :func:`save_pretrained` (weights, record, model card, custom code) and upload the folder.

    Works for transformers and timm models. Returns huggingface_hub's ``CommitInfo``.

    Example:
        >>> push_to_hub(model, "me/bert-sst2-cuttlefish", training_notes="SST-2, 3 epochs")  # doctest: +SKIP
    """
    api = HfApi(token=token, library_name="cuttlefish_hf", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, training_notes=training_notes, repo_id=repo_id, remote_code=remote_code)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)


# -- timm -----------------------------------------------------------------------------------------------------
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
    """Rebuild a factorized timm model from a folder or Hub repo saved by :func:`save_timm` / :func:`push_to_hub`.

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
        plan = _check_plan_format(record.get("plan"), f"{folder}/config.json")
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
