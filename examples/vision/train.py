"""Image classification with Cuttlefish low-rank training, on Accelerate: timm / HF DeiT and ViT, timm ResNet-18.

The same script trains one of the low-rank methods of ``cuttlefish_hf`` (``--mode cuttlefish``, ``pufferfish`` or
``si_fd``) or, with ``--no_cuttlefish``, the dense model; the loop calls the library's framework-neutral controller
after each optimizer step and each epoch, and re-wraps the model for DDP when it switches to low rank.

Data: an ImageNet-layout folder (``train/`` and ``val/``, one sub-folder per class), the four Fashion-MNIST (or
MNIST) IDX files, or CIFAR-10's python batches; the kind is detected from the folder.

Run it on one process (CPU here; add nothing on a GPU machine):

    python examples/vision/train.py --cpu --data-dir /usr/share/datasets/fashion-mnist \
        --model deit_tiny_patch16_224 --img-size 28 --patch-size 7 --in-chans 1 --embed-dim 96 --depth 4 \
        --num-heads 3 --mode cuttlefish

on several processes (DDP), on GPUs and on CPUs (gloo; ``--multi_gpu`` picks the torchrun-style launcher there,
while ``--cpu --num_processes 2`` alone would start one process unless mpirun is set up):

    accelerate launch --num_processes 2 examples/vision/train.py --data-dir ... --mode cuttlefish
    accelerate launch --multi_gpu --num_processes 2 examples/vision/train.py --cpu --data-dir ... --mode cuttlefish
    torchrun --nproc_per_node 2 examples/vision/train.py --cpu --data-dir ... --mode cuttlefish

with mixed precision:

    accelerate launch --mixed_precision bf16 examples/vision/train.py --data-dir ... --mixed_precision bf16

Other models: ``--model hf-deit`` / ``--model hf-vit`` (a transformers model built from the size flags), a
transformers ``config.json`` or a saved transformers folder, ``--model resnet18 --cifar-stem`` (3x3 stride-1
first conv, no max-pool; registered with timm as ``resnet18_cifar``), or any timm model name. Every
``CuttlefishConfig`` field is a flag of its own, read by ``HfArgumentParser`` as in ``examples/glue/run_glue.py``
(e.g. ``--window 3 --rank_rule energy --rank_pattern '{"mlp.fc1": 32}'``). On a shared CPU machine set
``OMP_NUM_THREADS=1`` per process.

Writes ``results.json`` (per-epoch metrics, parameter counts, switch point, timings, machine), ``stable_ranks.png``
and the final model (``model/``: reload timm models with ``cuttlefish_hf.hub.load_timm``, transformers models with
``AutoModelForImageClassification.from_pretrained`` after ``import cuttlefish_hf``) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import pickle
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

import cuttlefish_hf
from cuttlefish_hf import Cuttlefish, CuttlefishConfig, find_targets, hub
from cuttlefish_hf import logging_utils as cuttlefish_logging
from cuttlefish_hf.plotting import plot_stable_ranks
from cuttlefish_hf.surgery import count_parameters

logger = get_logger(__name__)


# -- data -----------------------------------------------------------------------------------------------------
# Per-dataset defaults: native image size, normalization (from the training images) and eval crop fraction.
DATASETS = {
    "imagefolder": {"size": 224, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875},
    "fashion_mnist": {"size": 28, "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0},
    "cifar10": {"size": 32, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "crop_pct": 1.0},
}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def detect_dataset(data_dir: Path) -> str:
    """``imagefolder`` (``train/`` + ``val/``), ``fashion_mnist`` (IDX files) or ``cifar10`` (python batches)."""
    if (data_dir / "train").is_dir():
        return "imagefolder"
    if _find_file(data_dir, IDX_FILES["train"][0]) is not None:
        return "fashion_mnist"
    if (data_dir / "data_batch_1").is_file() or (data_dir / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "cifar10"
    raise ValueError(f"{data_dir} holds no known dataset: expected train/ and val/ class folders, the IDX files "
                     f"{IDX_FILES['train']} (.gz or not), or CIFAR-10's data_batch_1..5 and test_batch.")


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped or not) of unsigned bytes into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not data[3]:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}).")
    header = 4 + 4 * data[3]  # the magic, then one 4-byte size per dimension
    if len(data) < header:
        raise ValueError(f"{path}: its header is cut short ({len(data)} bytes); the file is damaged.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3]))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes) but {len(data) - header} "
                         f"bytes follow; the file is damaged.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (or MNIST) IDX files as ``(N, H, W)`` uint8 images and their ``N`` labels."""
    image_path, label_path = (_find_file(data_dir, name) for name in IDX_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{image_path} must hold N x H x W images and {label_path} N labels; their shapes are "
                         f"{images.shape} and {labels.shape}.")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
                         f"each image needs one label.")
    return images, labels


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes in protocols 0-2: latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


# The only globals a CIFAR-10 batch may name: numpy's array rebuilders (numpy.core before numpy 2, numpy._core
# since; taken from what an array pickles with) and Python 3's bytes encoding of old protocols.
_ARRAY = np.zeros(1, dtype=np.uint8)
CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1,
    **{(f"{package}.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0] for package in ("numpy.core", "numpy._core")},
    **{(f"{package}.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0] for package in ("numpy.core", "numpy._core")},
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch without running code: any global but numpy's array rebuilders is refused."""

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise ValueError(f"{self.path}: refusing to load {module}.{name}; a CIFAR-10 python batch holds only "
                             f"dicts, lists, bytes and numpy arrays, and unpickling anything else can run code. Use "
                             f"the batches of cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html.")
        return CIFAR_PICKLE_GLOBALS[module, name]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as ``(N, 32, 32, 3)`` uint8 images and ``N`` int labels, without running code."""
    with open(path, "rb") as handle:
        try:
            batch = CifarUnpickler(handle, path).load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {error}") from error
    if isinstance(batch, dict) and b"data" in batch and b"labels" in batch:
        images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        if (images.dtype == np.uint8 and images.ndim == 2 and images.shape[1] == 3 * 32 * 32
                and labels.shape == (len(images),) and labels.dtype.kind in "iu"):
            return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # planes R, G, B -> pixels
    raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' (N x 3072 uint8) and "
                     f"b'labels' (N labels).")


def read_cifar10(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches as ``(N, 32, 32, 3)`` uint8 images and int labels."""
    if (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = zip(*(read_cifar_batch(data_dir / name) for name in names))
    return np.concatenate(images), np.concatenate(labels)


class ArrayImages(Dataset):
    """Images held in a uint8 array, served as PIL images through a torchvision/timm transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, mode: str) -> None:
        self.images, self.labels, self.transform, self.mode = images, labels.astype(np.int64), transform, mode
        self.classes = sorted(set(self.labels.tolist()))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]).convert(self.mode)
        return self.transform(image), int(self.labels[index])


def load_split(kind: str, data_dir: Path, split: str, transform, mode: str) -> Dataset:
    if kind == "imagefolder":
        folder = data_dir / split
        return ImageFolder(str(folder), transform=transform, loader=lambda path: Image.open(path).convert(mode))
    if kind == "fashion_mnist":
        return ArrayImages(*read_fashion_mnist(data_dir, split), transform, mode)
    return ArrayImages(*read_cifar10(data_dir, split), transform, mode)


def align_eval_classes(train: Dataset, evaluation: Dataset, data_dir: Path) -> None:
    """Refuse evaluation labels that training lacks (the model has no class for them), and give class folders the
    training ids: ImageFolder numbers each split's folders on its own."""
    unseen = sorted(set(evaluation.classes) - set(train.classes))
    if unseen:
        raise ValueError(f"the val split of {data_dir} has labels {unseen} that the train split lacks: the model "
                         f"would have no class for them. Remove them from val or add training images of them.")
    if isinstance(evaluation, ImageFolder) and evaluation.classes != train.classes:
        evaluation.samples = [(path, train.class_to_idx[evaluation.classes[target]])
                              for path, target in evaluation.samples]
        evaluation.imgs, evaluation.targets = evaluation.samples, [target for _, target in evaluation.samples]
        evaluation.classes, evaluation.class_to_idx = train.classes, train.class_to_idx


def channel_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Normalization statistics for ``channels`` channels (averaged or repeated from the dataset's)."""
    if len(values) == channels:
        return tuple(values)
    return (sum(values) / len(values),) * channels


def subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``size`` examples (the whole dataset when ``size`` is None)."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def get_dataloaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int, int]:
    """Training and evaluation loaders with timm's transforms, the number of classes and the image side."""
    data_dir = Path(args.data_dir)
    kind = args.dataset if args.dataset != "auto" else detect_dataset(data_dir)
    spec = DATASETS[kind]
    size = args.img_size or spec["size"]
    mean, std = channel_stats(spec["mean"], args.in_chans), channel_stats(spec["std"], args.in_chans)
    train_transform = create_transform((args.in_chans, size, size), is_training=True, scale=tuple(args.crop_scale),
                                       hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
                                       re_prob=args.reprob, interpolation="bilinear", mean=mean, std=std)
    eval_transform = create_transform((args.in_chans, size, size), is_training=False, interpolation="bilinear",
                                      crop_pct=args.crop_pct or spec["crop_pct"], mean=mean, std=std)
    mode = "L" if args.in_chans == 1 else "RGB"
    train = load_split(kind, data_dir, "train", train_transform, mode)
    evaluation = load_split(kind, data_dir, "val", eval_transform, mode)
    align_eval_classes(train, evaluation, data_dir)
    num_classes = len(train.classes)
    train, evaluation = subset(train, args.train_subset, args.seed), subset(evaluation, args.eval_subset, args.seed)
    # drop_last keeps every batch the same (even) size, as mixup/cutmix need.
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    eval_loader = DataLoader(evaluation, batch_size=args.eval_batch_size or 2 * args.batch_size,
                             num_workers=args.num_workers)
    return train_loader, eval_loader, num_classes, size


# -- models ---------------------------------------------------------------------------------------------------
default_cfgs = generate_default_cfgs({"resnet18_cifar.untrained": {
    "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0, "interpolation": "bilinear",
    "mean": DATASETS["cifar10"]["mean"], "std": DATASETS["cifar10"]["std"], "first_conv": "conv1",
    "classifier": "fc"}})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool (32x32 inputs keep their detail).

    Registered with timm, so ``timm.create_model("resnet18_cifar")`` and ``cuttlefish_hf.hub.load_timm`` rebuild it.
    """
    model = build_model_with_cfg(ResNet, "resnet18_cifar", pretrained, block=BasicBlock, layers=(2, 2, 2, 2),
                                 **kwargs)
    model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(args: argparse.Namespace, num_classes: int, image_size: int) -> nn.Module:
    """A timm model by name, a transformers DeiT/ViT (``hf-deit``, ``hf-vit``, a config.json or a saved folder)."""
    name = args.model
    if name in ("hf-deit", "hf-vit") or os.path.exists(name):
        return build_transformers_model(args, num_classes, image_size)
    if args.cifar_stem:
        if name != "resnet18":
            raise ValueError(f"--cifar-stem is for --model resnet18 (got {name!r}).")
        name = "resnet18_cifar"
    kwargs = {"num_classes": num_classes, "in_chans": args.in_chans, "drop_path_rate": args.drop_path}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        # Transformers with learned position embeddings are built for one input size: the data's.
        kwargs["img_size"] = image_size
    kwargs.update(patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    return timm.create_model(name, pretrained=args.pretrained, **kwargs)  # timm drops the None overrides


def build_transformers_model(args: argparse.Namespace, num_classes: int, image_size: int) -> nn.Module:
    from transformers import (AutoConfig, AutoModelForImageClassification, DeiTConfig, DeiTForImageClassification,
                              ViTConfig, ViTForImageClassification)

    common = {"num_labels": num_classes, "image_size": image_size, "num_channels": args.in_chans}
    folder = Path(args.model)
    if folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
        # Trained weights: keep their input size and channels; only the classifier may be re-initialized.
        return AutoModelForImageClassification.from_pretrained(folder, num_labels=num_classes,
                                                               ignore_mismatched_sizes=True)
    if args.model in ("hf-deit", "hf-vit"):
        hidden = args.embed_dim or 192
        sizes = {"hidden_size": hidden, "num_hidden_layers": args.depth or 12,
                 "num_attention_heads": args.num_heads or 3, "intermediate_size": int(args.mlp_ratio * hidden),
                 "patch_size": args.patch_size or 16}
        if args.model == "hf-deit":
            return DeiTForImageClassification(DeiTConfig(**sizes, **common))
        return ViTForImageClassification(ViTConfig(**sizes, **common))
    return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(args.model, **common))


def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class scores from a timm model (a tensor) or a transformers model (an output with ``.logits``)."""
    output = model(images)
    return output.logits if hasattr(output, "logits") else output


# -- Cuttlefish -----------------------------------------------------------------------------------------------
def rewrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """After the switch: a new DDP wrapper (the old one's reducer knows only the replaced weights)."""
    return accelerator.prepare_model(accelerator.unwrap_model(model, keep_fp32_wrapper=False))


def target_parameters(model: nn.Module) -> int:
    """Parameters in the layers Cuttlefish targets by default (dense or factorized), to compare runs."""
    modules = dict(model.named_modules())
    return sum(count_parameters(modules[name]) for name in find_targets(model))


def replica_view(model: nn.Module, controller: Cuttlefish | None, accelerator: Accelerator) -> dict:
    """What one process holds at the end: its plan, switch step and a fingerprint of its weights."""
    weights = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    return {"process_index": accelerator.process_index,
            "switch_step": None if controller is None else controller.switch_step,
            "plan": {} if controller is None or controller.report is None else controller.report.plan,
            "weights_sum": weights.sum().item(), "weights_norm": weights.norm().item()}


def machine(accelerator: Accelerator) -> dict:
    import accelerate
    import torchvision
    import transformers

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(accelerator.device),
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                         "cuttlefish_hf": cuttlefish_hf.__version__}}


# -- training -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions, labels = accelerator.gather_for_metrics((logits_of(model, images).argmax(-1), labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return 100.0 * correct / max(total, 1)


def training_function(args: argparse.Namespace, config: CuttlefishConfig | None) -> tuple[nn.Module, dict]:
    """Train (dense when ``config`` is None), evaluate each epoch, write results/plot/model; returns the trained
    (unwrapped) model and results."""
    start = time.perf_counter()
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    train_loader, eval_loader, num_classes, image_size = get_dataloaders(args)
    model = build_model(args, num_classes, image_size)
    params_before, targets_before = count_parameters(model), target_parameters(model)
    # timm's factory keeps norms, biases and tokens in a weight_decay=0 group; with Frobenius decay on, the new
    # factors join that group at the switch.
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    # Counted in batches of the whole dataset: Accelerate steps the schedule once per process and batch.
    total_steps = args.epochs * len(train_loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_epochs * len(train_loader)), total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    loss_fn = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    controller = None
    if config is not None:
        steps_per_epoch = len(train_loader)  # optimizer steps of this process
        controller = Cuttlefish(accelerator.unwrap_model(model), config, total_steps=args.epochs * steps_per_epoch,
                                steps_per_epoch=steps_per_epoch)
        if controller.begin(optimizer, scheduler):  # SI&FD factorizes before the first step
            model = rewrap(accelerator, model)

    history, step, train_seconds, eval_seconds = [], 0, 0.0, 0.0
    for epoch in range(args.epochs):
        epoch_start, losses = time.perf_counter(), []
        model.train()
        # Bars on the main process only, and only on a terminal (None), so log files stay readable.
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=None if accelerator.is_local_main_process else True)
        for images, labels in bar:
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            loss = loss_fn(logits_of(model, images), targets)
            accelerator.backward(loss)
            if args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if controller is not None and controller.step_end(step, optimizer, scheduler):
                model = rewrap(accelerator, model)
        if controller is not None and controller.epoch_end(step, optimizer, scheduler):
            model = rewrap(accelerator, model)
        train_seconds += time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        accuracy = evaluate(model, eval_loader, accelerator)
        eval_seconds += time.perf_counter() - eval_start
        history.append({"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                        "eval_accuracy": accuracy, "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - epoch_start,
                        "params": count_parameters(accelerator.unwrap_model(model)),
                        "low_rank": bool(controller and controller.switched)})
        logger.info("epoch %d: train loss %.4f, eval accuracy %.2f%%, %s parameters%s", epoch + 1,
                    history[-1]["train_loss"], accuracy, f"{history[-1]['params']:,}",
                    " (low rank)" if history[-1]["low_rank"] else "", main_process_only=True)

    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    replicas = gather_object([replica_view(model, controller, accelerator)])
    summary = controller.summary() if controller is not None else {}
    results = {
        "args": vars(args),
        "config": None if config is None else config.to_dict(),
        "mode": "vanilla" if config is None else config.mode,
        "epochs": history,
        "final_accuracy": history[-1]["eval_accuracy"] if history else None,
        "best_accuracy": max((h["eval_accuracy"] for h in history), default=None),
        "params_before": params_before,
        "params_after": count_parameters(model),
        "target_params_before": targets_before,
        "target_params_after": target_parameters(model),
        "switch_step": summary.get("switch_step"),
        "switch_epoch": summary.get("switch_epoch"),
        "steps": step,
        "steps_after_switch": None if controller is None or not controller.switched else step - controller.switch_step,
        "measure_seconds": summary.get("measure_seconds", 0.0),
        "surgery_seconds": summary.get("surgery_seconds", 0.0),
        "measurement_overhead_percent": 100.0 * summary.get("measure_seconds", 0.0) / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - start,
        "cuttlefish": summary,
        "stable_rank_history": None if controller is None else
        {"steps": controller.measured_steps, "ranks": controller.tracker.history, "full_ranks": controller.full_ranks},
        "processes": replicas,
        "machine": machine(accelerator),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(args, model, controller, results)
    accelerator.wait_for_everyone()
    return model, results


def write_outputs(args: argparse.Namespace, model: nn.Module, controller: Cuttlefish | None, results: dict) -> None:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if controller is not None:  # with no measurement (e.g. --mode si_fd) the figure says so
        plot_stable_ranks(controller.tracker.history, controller.measured_steps, output_dir / "stable_ranks.png",
                          controller.switch_step, controller.full_ranks,
                          title=f"{args.model} on {Path(args.data_dir).name}: stable rank ({results['mode']})")
    notes = {"mode": results["mode"], "data": Path(args.data_dir).name, "epochs": args.epochs,
             "final accuracy %": f"{results['final_accuracy']:.2f}", "switch epoch": results["switch_epoch"]}
    hub.save_pretrained(model, output_dir / "model", training_notes=notes)
    with open(output_dir / "results.json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    if controller is not None and controller.report is not None:
        logger.info("Cuttlefish plan:\n%s", controller.report)
    logger.info("wrote %s", output_dir / "results.json")


@dataclass
class CuttlefishSwitch:
    """Whether to train with Cuttlefish; its settings are the fields of ``CuttlefishConfig`` (``--mode``, ...)."""

    cuttlefish: bool = field(default=True, metadata={"help": (
        "Train with the method that --mode picks, configured by the flags under 'Cuttlefish'; --no_cuttlefish "
        "trains the dense model.")})


def get_parser() -> HfArgumentParser:
    """The script's flags after the ``CuttlefishConfig`` fields (HfArgumentParser is an argparse parser)."""
    parser = HfArgumentParser((CuttlefishSwitch, CuttlefishConfig), description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="ImageNet-layout folder, IDX files or CIFAR-10 batches")
    parser.add_argument("--dataset", default="auto", choices=("auto", *DATASETS), help="what --data-dir holds")
    parser.add_argument("--output-dir", default="outputs/vision", help="results.json, stable_ranks.png, model/")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="deit_tiny_patch16_224",
                       help="timm name, hf-deit, hf-vit, a transformers config.json or saved folder")
    model.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the Hub)")
    model.add_argument("--img-size", type=int, default=None, help="input side (default: the dataset's)")
    model.add_argument("--in-chans", type=int, default=3, help="input channels (1 reads images as grayscale)")
    model.add_argument("--patch-size", type=int, default=None, help="ViT/DeiT patch size override")
    model.add_argument("--embed-dim", type=int, default=None, help="ViT/DeiT width override")
    model.add_argument("--depth", type=int, default=None, help="ViT/DeiT blocks override")
    model.add_argument("--num-heads", type=int, default=None, help="ViT/DeiT heads override")
    model.add_argument("--mlp-ratio", type=float, default=4.0, help="FFN width / width (hf-deit, hf-vit)")
    model.add_argument("--cifar-stem", action="store_true", help="ResNet-18: 3x3 stride-1 first conv, no max-pool")
    model.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128, help="per process")
    train.add_argument("--eval-batch-size", type=int, default=None, help="per process (default: 2x batch size)")
    train.add_argument("--opt", default="adamw", help="timm optimizer name")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms, biases, tokens")
    train.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay")
    train.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping")
    train.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    train.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    train.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    train.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop scale")
    train.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    train.add_argument("--color-jitter", type=float, default=0.4, help="color jitter strength")
    train.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5")
    train.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    train.add_argument("--crop-pct", type=float, default=None, help="eval center-crop fraction")
    train.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset")
    train.add_argument("--eval-subset", type=int, default=None, help="evaluate on a fixed random subset")
    train.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16", "fp8"),
                       help="default: accelerate config / launch flag")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, CuttlefishConfig | None]:
    """The script's flags and the ``CuttlefishConfig`` (None with ``--no_cuttlefish``); a bad value exits with an
    argparse error."""
    parser = get_parser()
    try:
        switch, config, args = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # a config field out of range, or a flag no one takes
        parser.error(str(error))
    if switch.cuttlefish:
        return args, config
    if config != CuttlefishConfig():
        logging.getLogger(__name__).warning("Cuttlefish flags were given with --no_cuttlefish: this run trains "
                                            "the dense model.")
    return args, None


def main(argv: list[str] | None = None) -> tuple[nn.Module, dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cuttlefish_logging.set_verbosity_info()  # the switch summary (library loggers follow their own verbosity)
    return training_function(*parse_arguments(argv))


if __name__ == "__main__":
    main()
