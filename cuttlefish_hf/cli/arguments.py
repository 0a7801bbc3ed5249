"""What the subcommands share: argparse types and loading MODEL (a folder, a Hub id or ``timm:NAME``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

_HUB_ID = re.compile(r"(hf-hub:)?\w[\w.-]*(/\w[\w.-]*)?")


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(name, metavar=name.upper(), help=(
        "a local folder or Hub id (transformers, or timm when its config.json has 'architecture'), or timm:NAME "
        "for a timm model with random weights (offline)"))
    parser.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON", help=(
        "keyword arguments for timm.create_model with timm:NAME, e.g. '{\"depth\": 2, \"img_size\": 64}'"))


def _config_json(spec: str) -> dict[str, Any]:
    """config.json of a local folder, or fetched from the Hub."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec} has no config.json, so it is not a saved transformers or timm model.")
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    if path.exists() or not _HUB_ID.fullmatch(spec):
        raise ValueError(f"{spec}: no such folder (and not a Hub id such as 'owner/name'); pass a model folder, a "
                         "Hub id or timm:NAME.")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec.removeprefix("hf-hub:"), "config.json")).read_text())
    except Exception as error:  # offline, unknown repository, no access: all end the same way for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{spec} is not a local folder and its config.json could not be fetched from the Hub "
                         f"({first_line}); pass a model folder or timm:NAME.") from None


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A transformers or timm model (factorized checkpoints restored) from a folder, Hub id or ``timm:NAME``."""
    if spec.startswith("timm:"):
        import timm

        name = spec.removeprefix("timm:")
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}; list them with timm.list_models('*{name[:4]}*').")
        try:
            return timm.create_model(name, pretrained=False, **(model_kwargs or {}))
        except TypeError as error:
            raise ValueError(f"--model-kwargs do not fit timm model {name!r}: {error}") from None
    if model_kwargs:
        raise ValueError("--model-kwargs only applies to timm:NAME models.")
    config = _config_json(spec)
    try:
        if "architecture" in config:  # timm's layout
            from ..hub.timm import load_timm

            return load_timm(spec)
        import transformers

        from ..hub.transformers_loader import from_pretrained

        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        return from_pretrained(model_class or transformers.AutoModel, spec)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ValueError(f"could not load {spec}: {error}") from None
