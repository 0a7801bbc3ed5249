"""Time each candidate layer dense and factorized at its planned rank; list the layers to keep full-rank.

Example:
    cuttlefish-hf profile bert-base-uncased --batch-size 32 --seq-len 128 --device cuda --dtype bfloat16
    cuttlefish-hf profile timm:resnet50 --batch-size 64 --image-size 224

Each layer's input size comes from one forward pass of a batch of 1 (scaled to --batch-size). The decision is
the one ``CuttlefishConfig(skip_first_blocks="auto", profile_tokens_per_batch=batch x tokens)`` makes at the
switch (see ``cuttlefish_hf.profiling``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..layers import dense_shape
from ..profiling import profile_layers
from ..rank_rules import RANK_RULES
from ..targeting import block_indices
from .arguments import add_model_arguments, load_model, positive_int
from .inspect import inspect_layers

HELP = "time dense vs factorized forward+backward per layer; show which layers to keep full-rank"

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, required=True, help="the training batch size")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--seq-len", type=positive_int, help="tokens per sequence (text models)")
    size.add_argument("--image-size", type=positive_int, help="image height and width in pixels (vision models)")
    parser.add_argument("--rule", choices=RANK_RULES, default="fixed_ratio", help=(
        "how the planned ranks are chosen from the current weights (default: fixed_ratio, a typical rank after "
        "the switch; the other rules give full ranks on randomly initialized weights)"))
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="fixed_ratio's ratio (default: 0.25)")
    parser.add_argument("--energy", type=float, default=0.9, help="energy rule's threshold (default: 0.9)")
    parser.add_argument("--margin", type=float, default=0.1, help=(
        "factorize only when the low-rank layer takes at most (1 - margin) of the dense time (default: 0.1)"))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="training dtype (default: float32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per layer (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per layer (default: 2)")
    parser.add_argument("--compile", action="store_true", help=(
        "time each layer through torch.compile (inductor), as a compiled training step runs it"))


def _example_input(model: nn.Module, seq_len: int | None, image_size: int | None) -> dict[str, torch.Tensor]:
    """Keyword arguments of a batch-of-1 forward pass (``{"": tensor}`` for a positional timm input)."""
    config = getattr(model, "config", None)
    if seq_len is not None:
        if config is None or getattr(config, "num_channels", None) is not None:
            raise ValueError("--seq-len is for text models; pass --image-size for a vision model.")
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        return {"input_ids": ids, **({"decoder_input_ids": ids} if config.is_encoder_decoder else {})}
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError("--image-size is for vision models (this one has no Conv2d); pass --seq-len for text.")
    image = torch.zeros(1, first_conv.in_channels, image_size, image_size)
    return {"": image} if config is None else {"pixel_values": image}


@torch.no_grad()
def input_shapes(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
                 batch_size: int) -> dict[str, tuple[int, ...]]:
    """Each named layer's input shape for a batch of ``batch_size``, found by a batch-of-1 forward pass.

    A Linear's input is flattened to ``(rows, in)``; layers the forward pass does not reach are left out.
    """
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the inputs pass unchanged
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        model.eval()
        if "" in inputs:
            model(inputs[""])
        else:
            model(**inputs)
    except Exception as error:  # any model-specific failure: report it as a bad size, not a traceback
        raise ValueError(f"a forward pass with inputs of shape {[tuple(t.shape) for t in inputs.values()]} failed "
                         f"({type(error).__name__}: {error}); check --seq-len / --image-size.") from None
    finally:
        for handle in handles:
            handle.remove()
    return {name: (batch_size, *shape[1:]) if len(dense_shape(modules[name])) == 4
            else (batch_size * math.prod(shape[:-1]), shape[-1]) for name, shape in shapes.items()}


def _leading_dense_blocks(model: nn.Module, names: Sequence[str], keep: set[str]) -> int:
    """How many leading blocks (of those with timed layers) the timings keep entirely dense: the paper's K."""
    blocks = block_indices(model, list(names))
    count = 0
    for block in sorted(set(blocks.values())):
        if not all(name in keep for name, index in blocks.items() if index == block):
            break
        count += 1
    return count


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text!r} is not a device ({error}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text} asked for, but CUDA is not available here; use --device cpu.")
    return device


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.margin < 1:
        raise ValueError(f"--margin must be in [0, 1), got {args.margin}.")
    if not 0 < args.energy <= 1 or not 0 < args.rank_ratio <= 1:
        raise ValueError(f"--energy and --rank-ratio must be in (0, 1], got {args.energy} and {args.rank_ratio}.")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}.")
    device = _device(args.device)
    model = load_model(args.model, args.model_kwargs)
    infos = inspect_layers(model, energy=args.energy, ratio=args.rank_ratio)
    planned = {i.name: i.ranks[args.rule] for i in infos if i.factorize[args.rule]}
    if not planned:
        print(f"No layer would be factorized under rule {args.rule} (no rank saves parameters); nothing to time. "
              "Try --rule fixed_ratio.")
        return 0
    shapes = input_shapes(model, list(planned), _example_input(model, args.seq_len, args.image_size), args.batch_size)
    unreached = [name for name in planned if name not in shapes]
    if unreached:
        print(f"Not reached by the forward pass, not timed: {', '.join(unreached)}")
    planned = {name: rank for name, rank in planned.items() if name in shapes}
    report = profile_layers(model, planned, input_shapes=shapes, dtype=getattr(torch, args.dtype), device=device,
                            margin=args.margin, repeats=args.repeats, warmup=args.warmup, compiled=args.compile)
    print(report)
    keep = report.keep_dense
    print(f"would keep dense: {', '.join(keep) if keep else 'none'}")
    print(f"leading blocks kept entirely dense: {_leading_dense_blocks(model, list(planned), set(keep))}")
    return 0

