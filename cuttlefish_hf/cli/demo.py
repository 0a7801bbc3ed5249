"""Train a small ViT on scikit-learn's 8x8 digits, vanilla and with Cuttlefish, side by side (offline).

The data ships with scikit-learn and the model is built from scratch, so nothing is downloaded. The
Cuttlefish run uses the same framework-neutral controller as the Trainer callback, in a plain PyTorch loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch
from torch import nn

from ..config import CuttlefishConfig
from ..controller import Cuttlefish
from ..plotting import plot_stable_ranks
from ..surgery import count_parameters
from ..tables import render_table

HELP = "vanilla vs Cuttlefish on scikit-learn's digits with a small ViT (offline, a few minutes on 2 CPUs)"


def _machine() -> dict:
    """Where the demo ran: the numbers in results.json are only comparable on the same kind of machine."""
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
            "dtype": "float32", "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per run (default: 40)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    parser.add_argument("--width", type=int, default=96, help="ViT embedding width (default: 96)")
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--output-dir", default="cuttlefish-demo", help="where results.json and the plot go")


def digits_loaders(batch_size: int, seed: int):
    """scikit-learn's 1,797 8x8 digits as 1-channel images, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train = torch.utils.data.TensorDataset(images[order[:split]], labels[order[:split]])
    test = torch.utils.data.TensorDataset(images[order[split:]], labels[order[split:]])
    generator = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
            torch.utils.data.DataLoader(test, batch_size=256))


def small_vit(width: int, depth: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=width, depth=depth,
                             num_heads=4, mlp_ratio=4.0)


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    model.train()
    return 100.0 * correct / len(loader.dataset)


def train_run(mode: str, args: argparse.Namespace) -> tuple[dict, Cuttlefish | None]:
    """One training run; ``mode`` is 'vanilla' or 'cuttlefish'."""
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    train_loader, test_loader = digits_loaders(args.batch_size, args.seed)
    model = small_vit(args.width, args.depth)
    params_before = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    total = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * step / total)))
    controller = None
    if mode == "cuttlefish":
        controller = Cuttlefish(model, CuttlefishConfig(), total_steps=total, steps_per_epoch=len(train_loader))
        controller.begin(optimizer, scheduler)
    loss_fn = nn.CrossEntropyLoss()
    step, start = 0, time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{mode:>10}", unit="epoch")
    for _ in bar:
        for images, labels in train_loader:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if controller is not None:
                controller.step_end(step, optimizer, scheduler)  # times the steps (measuring is per epoch)
        if controller is not None:
            controller.epoch_end(step, optimizer, scheduler)
        bar.set_postfix(loss=f"{loss.item():.3f}", low_rank=bool(controller and controller.switched))
    result = {
        "mode": mode,
        "accuracy": accuracy(model, test_loader),
        "params": count_parameters(model),
        "params_before": params_before,
        "wall_seconds": time.perf_counter() - start,
    }
    if controller is not None:
        result["cuttlefish"] = controller.summary()
    return result, controller


def comparison_table(results: list[dict]) -> str:
    rows = []
    for result in results:
        switch = result.get("cuttlefish", {}).get("switch_epoch")
        rows.append((result["mode"], f"{result['accuracy']:.2f}", f"{result['params']:,}",
                     f"{result['wall_seconds']:.1f}", "-" if switch is None else f"{switch:.0f}"))
    return render_table(("run", "accuracy %", "params", "wall s", "switch epoch"), rows)


def run(args: argparse.Namespace) -> int:
    os.makedirs(args.output_dir, exist_ok=True)
    vanilla, _ = train_run("vanilla", args)
    low_rank, controller = train_run("cuttlefish", args)
    print("\n" + comparison_table([vanilla, low_rank]))
    print("\nCuttlefish per-layer ranks:\n" + str(controller.report))
    plot = plot_stable_ranks(controller.tracker.history, controller.measured_steps,
                             os.path.join(args.output_dir, "stable_ranks.png"), controller.switch_step,
                             controller.full_ranks)
    results = os.path.join(args.output_dir, "results.json")
    with open(results, "w", encoding="utf-8") as handle:
        json.dump({"args": vars(args), "runs": [vanilla, low_rank], "machine": _machine()}, handle, indent=2,
                  default=str)
    print(f"\nwrote {results} and {plot}")
    return 0
