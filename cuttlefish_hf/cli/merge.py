"""Fold a factorized model's low-rank factors back into dense layers and save it as an ordinary checkpoint.

Example:
    cuttlefish-hf merge outputs/bert-cuttlefish outputs/bert-dense

The result loads with plain ``AutoModel*.from_pretrained`` (transformers) or ``timm.create_model(
"local-dir:DST", pretrained=True)`` (timm), without cuttlefish_hf. Tokenizer and processor files of a local SRC
are copied along.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from torch import nn

from ..hub.record import is_transformers_model
from ..hub.remote_code import REMOTE_CODE_FILE, forget_remote_code
from ..surgery import count_parameters, factorized_plan, merge_
from .arguments import add_model_arguments, load_model

HELP = "fold low-rank factors back into dense layers and save a plain checkpoint"

# Files of SRC that describe the factorized model itself: DST gets its own.
_NOT_COPIED = ("*.safetensors", "*.bin", "*.index.json", "config.json", "README.md", REMOTE_CODE_FILE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "src")
    parser.add_argument("dst", metavar="DST", help="folder to write the dense model to")
    parser.add_argument("--overwrite", action="store_true", help="write into DST even if it is not empty")


def save_dense(model: nn.Module, folder: Path) -> str:
    """Save with the model's own library; returns which one."""
    if is_transformers_model(model):
        forget_remote_code(model.config)
        model.save_pretrained(folder)  # merged: the Cuttlefish record leaves config.json
        return "transformers"
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return "timm"


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer / processor files of a local SRC that DST lacks."""
    if not src.is_dir():
        return []
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not any(path.match(pattern) for pattern in _NOT_COPIED) and \
                not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def run(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.resolve() == Path(args.src).resolve():
        raise ValueError("DST must differ from SRC: the factorized weights are read while the dense ones are written.")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise ValueError(f"{dst} exists and is not an empty folder; choose another DST or pass --overwrite.")
    model = load_model(args.src, args.model_kwargs)
    plan = factorized_plan(model)
    if not plan:
        raise ValueError(f"{args.src} has no factorized layers; nothing to merge.")
    before = count_parameters(model)
    merge_(model)
    dst.mkdir(parents=True, exist_ok=True)
    library = save_dense(model, dst)
    copied = _copy_side_files(Path(args.src), dst)
    layers = f"{len(plan)} factorized layer{'s' if len(plan) > 1 else ''}"
    print(f"merged {layers}: {before:,} -> {count_parameters(model):,} parameters; saved a dense {library} model "
          f"to {dst}" + (f" (copied {', '.join(copied)})" if copied else ""))
    return 0
