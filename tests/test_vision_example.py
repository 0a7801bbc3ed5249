"""examples/vision/train.py: timm DeiT, HF DeiT and ResNet-18 runs that switch and keep training, on tiny generated
image folders, IDX files and CIFAR-10 batches; full-rank conv factorization; one plan for the controller and the
Trainer callback; a 2-process CPU run with identical plans and weights."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import free_port, tiny_hf_deit
from PIL import Image
from torch import nn

from cuttlefish_hf import Cuttlefish, CuttlefishCallback, CuttlefishConfig, factorize_, find_targets
from cuttlefish_hf.hub import load_timm
from cuttlefish_hf.layers import FactorizedConv2d, FactorizedLayer, full_rank

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vision" / "train.py"


def _import_example():
    # Registered under a module name so that timm's @register_model (resnet18_cifar) finds its default config.
    spec = importlib.util.spec_from_file_location("vision_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _import_example()

TINY_DEIT = ["--model", "deit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
             "--depth", "2", "--num-heads", "2"]
TINY_HF_DEIT = ["--model", "hf-deit", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
                "--num-heads", "2", "--mlp-ratio", "2"]


# -- tiny data ------------------------------------------------------------------------------------------------
def _class_images(rng: np.random.Generator, label: int, count: int, size: int, channels: int) -> np.ndarray:
    """Noise plus a bright class-dependent band: learnable in a few steps."""
    images = rng.integers(0, 80, (count, size, size, channels), dtype=np.uint8)
    band = slice(label * size // 3, (label + 1) * size // 3)
    images[:, band, :, :] += 150
    return images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """ImageNet layout: train/ and val/, one folder of PNGs per class."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in range(3):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i, image in enumerate(_class_images(rng, label, count, 20, 3)):
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _labelled(rng: np.random.Generator, per_class: int, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(3), per_class)
    images = np.concatenate([_class_images(rng, label, per_class, size, channels) for label in range(3)])
    return images, labels


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    """Fashion-MNIST's four IDX files (gzipped), 16x16 grayscale."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(1)
    for prefix, per_class in (("train", 8), ("t10k", 4)):
        images, labels = _labelled(rng, per_class, 16, 1)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """CIFAR-10's python batches (cifar-10-batches-py/), 32x32 RGB, a few images each."""
    root = tmp_path_factory.mktemp("cifar")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = _labelled(rng, 2, 32, 3)
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores planes: R, G, B
        with open(batches / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, handle)
    return root


def test_data_readers(image_folder, idx_folder, cifar_folder, tmp_path):
    assert train.detect_dataset(image_folder) == "imagefolder"
    assert train.detect_dataset(idx_folder) == "fashion_mnist"
    assert train.detect_dataset(cifar_folder) == "cifar10"
    with pytest.raises(ValueError, match="no known dataset"):
        train.detect_dataset(tmp_path)
    images = train.read_idx(idx_folder / "train-images-idx3-ubyte.gz")
    assert images.shape == (24, 16, 16) and images.dtype == np.uint8
    _write_idx(tmp_path / "raw-idx1-ubyte", np.arange(5))  # not gzipped
    np.testing.assert_array_equal(train.read_idx(tmp_path / "raw-idx1-ubyte"), np.arange(5))
    images, labels = train.read_cifar10(cifar_folder, "train")
    assert images.shape == (30, 32, 32, 3) and labels.tolist()[:2] == [0, 0]
    assert images[0, :10, :, 0].mean() > images[0, 20:, :, 0].mean()  # the band of class 0 is at the top


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Payload(), b"labels": [0]}, handle)
    with pytest.raises(ValueError, match=r"data_batch_1: refusing to load builtins\.exec"):
        train.read_cifar10(tmp_path, "train")
    assert not marker.exists()
    with open(tmp_path / "data_batch_1", "rb") as handle:  # the payload is real: plain pickle runs it
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_with_their_values(tmp_path, protocol):
    """Batches as CIFAR-10 ships them (a dict of bytes keys, a uint8 N x 3072 array of R, G, B planes, a label list)
    in the pickle protocols numpy writes them with."""
    data = np.concatenate([np.full((2, 1024), value, np.uint8) for value in (10, 20, 30)], axis=1)
    data[1] += 1
    data[0, 1] = 99  # red, row 0, column 1
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [7, 3], b"data": data,
             b"filenames": [b"a.png", b"b.png"]}
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:  # the real files name numpy's module as the numpy of their time did
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    (tmp_path / "test_batch").write_bytes(raw)
    images, labels = train.read_cifar10(tmp_path, "val")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and labels.tolist() == [7, 3]
    assert images[0, 0, 1].tolist() == [99, 20, 30] and images[0, 5, 7].tolist() == [10, 20, 30]
    assert images[1, 31, 31].tolist() == [11, 21, 31]
    del batch[b"labels"]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 python batch: expected a dict with "
                                         r"b'data' \(N x 3072 uint8\) and b'labels' \(N labels\)"):
        train.read_cifar10(tmp_path, "val")


def test_idx_files_that_disagree_or_are_damaged_are_refused(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 4)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte holds 5 images but \S*train-labels-idx1-ubyte "
                                         r"holds 4 labels"):
        train.load_split("fashion_mnist", tmp_path, "train", transform=None, mode="L")
    path = tmp_path / "damaged"
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 4, 4))
    for content, message in [(header + bytes(79), r": header says shape \(5, 4, 4\) \(80 bytes\) but 79 bytes follow"),
                             (header + bytes(81), r": header says shape \(5, 4, 4\) \(80 bytes\) but 81 bytes follow"),
                             (header[:10], r": its header is cut short"),
                             (b"\x00", r" is not an IDX file of unsigned bytes"),
                             (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), r" is not an IDX file of unsigned bytes"),
                             (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 0]), r" is not an IDX file of unsigned bytes")]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"damaged{message}"):
            train.read_idx(path)


def _tiny_image_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for split, classes in layout.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_eval_labels_unseen_in_training_are_refused_before_training(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, labels in (("train", [0, 1, 2, 0]), ("t10k", [0, 5, 2, 7])):
        _write_idx(idx / f"{prefix}-images-idx3-ubyte", np.zeros((4, 8, 8)))
        _write_idx(idx / f"{prefix}-labels-idx1-ubyte", np.array(labels))
    folders = _tiny_image_folder(tmp_path / "folders", {"train": ["cat", "dog"], "val": ["cat", "cow"]})
    for data_dir, unseen in ((idx, r"\[5, 7\]"), (folders, r"\['cow'\]")):
        with pytest.raises(ValueError, match=rf"the val split of \S+ has labels {unseen} that the train split lacks"):
            run_example(data_dir, tmp_path / "out", *TINY_DEIT, "--epochs", "1", "--batch-size", "2")
        assert not (tmp_path / "out").exists()


def test_eval_folders_missing_a_class_keep_the_training_ids(tmp_path):
    root = _tiny_image_folder(tmp_path, {"train": ["cat", "cow", "dog"], "val": ["dog"]})
    args = train.get_parser().parse_args(["--data-dir", str(root), "--img-size", "8", "--num-workers", "0"])
    _, eval_loader, num_classes, _ = train.get_dataloaders(args)
    assert num_classes == 3 and [label for _, label in eval_loader.dataset] == [2, 2]  # dog is class 2, not 0


# -- flags ------------------------------------------------------------------------------------------------------
def test_cuttlefish_flags_are_the_config_fields_parsed_by_hf_argument_parser():
    from transformers import HfArgumentParser

    flags = ["--mode", "pufferfish", "--window", "3", "--measure-every-steps", "5", "--extra_bn", "false",
             "--frobenius_decay", "0", "--skip_first_blocks", "auto", "--target_modules", '["qkv", "fc1"]',
             "--rank_pattern", '{"mlp.fc1": 32}', "--power_iteration_seed", "4"]
    args, config = train.parse_arguments(["--data-dir", "data", "--seed", "9", "--crop-scale", "0.5", "1", *flags])
    expected = CuttlefishConfig(mode="pufferfish", window=3, measure_every_steps=5, extra_bn=False, frobenius_decay=0.0,
                                skip_first_blocks="auto", target_modules=["qkv", "fc1"], rank_pattern={"mlp.fc1": 32},
                                power_iteration_seed=4)
    assert config == expected
    assert HfArgumentParser(CuttlefishConfig).parse_args_into_dataclasses(flags) == (expected,)  # as run_glue reads
    assert (args.data_dir, args.seed, args.crop_scale) == ("data", 9, [0.5, 1.0])  # the script's own flags
    assert not hasattr(args, "mode") and not hasattr(args, "window")
    assert train.parse_arguments(["--data-dir", "data"])[1] == CuttlefishConfig()  # on by default
    assert train.parse_arguments(["--data-dir", "data", "--no_cuttlefish"])[1] is None
    assert train.parse_arguments(["--data-dir", "data", "--cuttlefish", "false"])[1] is None


@pytest.mark.parametrize("flags,message", [
    (["--mode", "vanilla"], "mode='vanilla' is not valid; choose one of"),
    (["--rank_pattern", '{"mlp.fc1": 0}'], "rank_pattern['mlp.fc1'] must be a positive int rank"),
    (["--skip_first_blocks", "first"], "skip_first_blocks must be an integer >= 0, 'auto'"),
    (["--window", "0"], "window must be an integer >= 1"),
    (["--cuttlefish", "window=3"], "--cuttlefish: Truthy value expected"),  # the old KEY=VALUE syntax
    (["--no_such_flag", "1"], "--no_such_flag"),
])
def test_bad_cuttlefish_flags_exit_with_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", "no-data", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: " in error and message in error


def readme_commands(readme: Path, script: str) -> list[list[str]]:
    """The arguments of each ``script`` command in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if script in line:
                words = shlex.split(line, comments=True)
                commands.append(words[[w.endswith(script) for w in words].index(True) + 1:])
    return commands


def test_the_readme_commands_parse_to_the_configs_they_describe():
    commands = readme_commands(EXAMPLE.parent / "README.md", "train.py")
    configs = [train.parse_arguments(command)[1] for command in commands]
    assert configs == [CuttlefishConfig()] * 5 + [None, CuttlefishConfig(
        measure_every_steps=50, rank_rule="energy", energy_threshold=0.95, exclude_modules=["blocks.0.attn.qkv"])]


# -- example runs ---------------------------------------------------------------------------------------------
def run_example(data_dir: Path, output_dir: Path, *flags: str):
    return train.main(["--cpu", "--data-dir", str(data_dir), "--output-dir", str(output_dir), "--num-workers", "0",
                       "--batch-size", "8", "--epochs", "4", "--lr", "2e-3", *flags])


def check_switched_and_kept_training(results: dict, output_dir: Path, switch_step: int | None = None) -> None:
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["final_accuracy"] == results["final_accuracy"]
    assert (output_dir / "model" / "model.safetensors").is_file()
    assert results["cuttlefish"]["plan"], "nothing was factorized"
    if switch_step is None:
        assert 0 < results["switch_step"] < results["steps"]
    else:
        assert results["switch_step"] == switch_step
    assert results["steps_after_switch"] > 0
    assert results["params_after"] < results["params_before"]
    assert results["target_params_after"] < results["target_params_before"]
    assert all(math.isfinite(epoch["train_loss"]) for epoch in results["epochs"])
    assert results["epochs"][-1]["low_rank"] and results["epochs"][-1]["params"] == results["params_after"]
    assert results["processes"][0]["plan"] == results["cuttlefish"]["plan"]
    for key in ("wall_seconds", "measurement_overhead_percent", "machine"):
        assert key in results


def test_timm_deit_cuttlefish_switches_and_keeps_training(image_folder, tmp_path):
    out = tmp_path / "out"
    model, results = run_example(image_folder, out, *TINY_DEIT, "--mode", "cuttlefish", "--mixup", "0.2",
                                 "--cutmix", "0.5", "--rank_rule", "stable_rank")
    check_switched_and_kept_training(results, out)
    assert results["switch_epoch"] == 2  # max_warmup_fraction=0.5 of 4 epochs, measured once per epoch
    assert (out / "stable_ranks.png").stat().st_size > 0
    assert len(results["stable_rank_history"]["steps"]) == 2
    reloaded = load_timm(out / "model")
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(reloaded(images), model.eval()(images), rtol=0, atol=1e-6)


def test_hf_deit_cuttlefish_switches_and_keeps_training(image_folder, tmp_path):
    from transformers import AutoModelForImageClassification, DeiTForImageClassification

    out = tmp_path / "out"
    model, results = run_example(image_folder, out, *TINY_HF_DEIT, "--mode", "cuttlefish",
                                 "--measure_every_steps", "2", "--rank-rule", "energy", "--energy_threshold", "0.5")
    assert isinstance(model, DeiTForImageClassification)
    check_switched_and_kept_training(results, out)
    assert results["switch_step"] % 2 == 0  # measured every 2 steps
    assert all(name.startswith("deit.layers.") for name in results["cuttlefish"]["plan"])
    reloaded = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(reloaded(images).logits, model.eval()(images).logits, rtol=0, atol=1e-6)


def test_resnet18_cifar_stem_pufferfish_with_extra_bn(idx_folder, tmp_path):
    out = tmp_path / "out"
    model, results = run_example(idx_folder, out, "--model", "resnet18", "--cifar-stem", "--in-chans", "1",
                                 "--mode", "pufferfish", "--crop-scale", "0.5", "1")
    check_switched_and_kept_training(results, out, switch_step=3)  # fixed warm-up: 25% of 12 steps
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool,
                                                                                             nn.Identity)
    plan = results["cuttlefish"]["plan"]
    assert "layer1.0.conv1" not in plan and "layer1.1.conv1" in plan  # Pufferfish keeps the first block dense
    layer = model.get_submodule("layer4.1.conv2")
    assert isinstance(layer, FactorizedConv2d) and isinstance(layer.middle, nn.BatchNorm2d)
    assert layer.rank == math.ceil(0.25 * 512)
    reloaded = load_timm(out / "model")
    images = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(reloaded(images), model.eval()(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["si_fd", "vanilla"])
def test_si_fd_and_vanilla_on_cifar_batches(cifar_folder, tmp_path, mode):
    out = tmp_path / "out"
    method = ["--no_cuttlefish"] if mode == "vanilla" else ["--mode", mode]
    model, results = run_example(cifar_folder, out, *TINY_DEIT, *method, "--epochs", "2", "--batch-size", "6")
    assert results["mode"] == mode
    assert all(math.isfinite(epoch["train_loss"]) for epoch in results["epochs"]) and results["steps"] == 10
    if mode == "si_fd":
        assert results["switch_step"] == 0 and results["steps_after_switch"] == results["steps"]
        assert results["cuttlefish"]["plan"] and results["params_after"] < results["params_before"]
        assert results["epochs"][0]["low_rank"]
    else:
        assert results["cuttlefish"] == {} and results["switch_step"] is None
        assert results["params_after"] == results["params_before"]
        assert not any(isinstance(m, FactorizedLayer) for m in model.modules())
    reloaded = load_timm(out / "model")
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(reloaded(images), model.eval()(images), rtol=0, atol=1e-6)


# -- conv factorization ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "resnet18_cifar"])
def test_full_rank_conv_factorization_reproduces_resnet18(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():  # timm zero-initializes each block's last BN: randomize so every conv matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    targets = find_targets(model)
    assert len(targets) == 16 and all(isinstance(model.get_submodule(n), nn.Conv2d) for n in targets)
    assert "conv1" not in targets and not any("downsample" in n for n in targets)  # stem and 1x1 convs stay
    factorize_(model, {n: full_rank(model.get_submodule(n)) for n in targets})
    assert sum(isinstance(m, FactorizedConv2d) for m in model.modules()) == 16
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


# -- one source of truth ----------------------------------------------------------------------------------------
def test_controller_and_trainer_callback_give_the_same_plan(tmp_path):
    from transformers import TrainingArguments
    from transformers.trainer_callback import TrainerControl, TrainerState

    def drift_(model: nn.Module, step: int) -> None:
        """The same weight trajectory for both models: a rank-1 direction that grows and settles."""
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name in find_targets(model):
                weight = model.get_submodule(name).weight
                u = torch.randn(weight.shape[0], 1, generator=generator)
                v = torch.randn(1, weight.shape[1], generator=generator)
                weight.add_(0.5 ** step * 0.05 * u @ v)

    config = CuttlefishConfig(measure_every_steps=1, window=2, min_warmup_measurements=2, eps_relative=0.02,
                              rank_rule="stable_rank")
    total_steps = 40
    model_a = tiny_hf_deit(image_size=16, patch_size=4)
    model_b = tiny_hf_deit(image_size=16, patch_size=4)  # seeded alike: the same weights
    optimizer_a = torch.optim.AdamW(model_a.parameters(), lr=1e-3)
    optimizer_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3)
    controller = Cuttlefish(model_a, config, total_steps=total_steps, steps_per_epoch=10)
    controller.begin(optimizer_a)

    callback = CuttlefishCallback(config)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    state, control = TrainerState(max_steps=total_steps, num_train_epochs=4), TrainerControl()
    callback.on_train_begin(args, state, control, model=model_b, optimizer=optimizer_b, train_dataloader=[])
    for step in range(1, total_steps + 1):
        drift_(model_a, step)
        drift_(model_b, step)
        state.global_step = step
        controller.step_end(step, optimizer_a)
        callback.on_step_end(args, state, control, optimizer=optimizer_b)
        if controller.switched and callback.controller.switched:
            break
    other = callback.controller
    assert controller.switch_step == other.switch_step is not None
    assert controller.switch_step < config.max_warmup_fraction * total_steps  # switched because ranks settled
    assert controller.tracker.history == other.tracker.history
    assert controller.decisions == other.decisions
    assert controller.report.plan == other.report.plan and controller.report.plan
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# -- two processes ----------------------------------------------------------------------------------------------
def test_two_cpu_processes_switch_with_identical_plans(image_folder, tmp_path):
    """torchrun, gloo: rank 0 decides, both processes factorize alike and the re-wrapped DDP keeps them in sync."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(EXAMPLE), "--cpu", "--data-dir", str(image_folder), "--output-dir", str(out),
               "--num-workers", "0", "--batch-size", "4", "--epochs", "4", *TINY_DEIT, "--mode", "cuttlefish",
               "--rank_rule", "stable_rank"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    first, second = results["processes"]
    assert results["machine"]["num_processes"] == 2 and (first["process_index"], second["process_index"]) == (0, 1)
    assert first["plan"] and first["plan"] == second["plan"]
    assert first["switch_step"] == second["switch_step"] == 6 and results["steps"] == 12  # 3 steps per epoch each
    # Six steps after the switch on different shards: equal weights only if the factors' gradients were synced.
    assert first["weights_sum"] == pytest.approx(second["weights_sum"], rel=0, abs=1e-9)
    assert first["weights_norm"] == pytest.approx(second["weights_norm"], rel=0, abs=1e-9)
