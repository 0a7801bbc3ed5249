"""Tiny models and data shared by the tests (offline, seconds on a CPU), and a free port for multi-process runs.

One builder per architecture. ``seed`` seeds torch's global generator first (``None``: build from the generator
as it stands, for a test that builds several models in a row); keyword overrides change the config. A builder
returns the model as its constructor leaves it (training mode): call ``.eval()`` where outputs are compared.
"""

from __future__ import annotations

import socket

import torch
from transformers import (BertConfig, BertForSequenceClassification, DeiTConfig, DeiTForImageClassification,
                          GPT2Config, GPT2LMHeadModel, PreTrainedModel)

# Like every model here: 2 blocks, 32 wide, 2 heads. In timm's keywords, as test_cli passes them to --model-kwargs.
TINY_TIMM_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def tiny_bert(seed: int | None = 0, num_labels: int = 2, *,
              model_class: type[PreTrainedModel] = BertForSequenceClassification,
              **config_overrides) -> PreTrainedModel:
    """A BERT with a 64-token vocabulary and 32 positions; ``model_class`` picks the head (``BertForMaskedLM``)."""
    _seed(seed)
    config = BertConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 32, "num_labels": num_labels,
                           **config_overrides})
    return model_class(config)


def tiny_gpt2(seed: int | None = 0, **config_overrides) -> GPT2LMHeadModel:
    """A GPT-2 (``Conv1D`` layers, tied head) with a 64-token vocabulary and 16 positions."""
    _seed(seed)
    config = GPT2Config(**{"vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2,
                           **config_overrides})
    return GPT2LMHeadModel(config)


def tiny_hf_deit(seed: int | None = 0, num_labels: int = 3, **config_overrides) -> DeiTForImageClassification:
    """transformers' DeiT on 32x32 images in 8x8 patches."""
    _seed(seed)
    config = DeiTConfig(**{"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 64, "num_labels": num_labels,
                           **config_overrides})
    return DeiTForImageClassification(config)


def tiny_timm_deit(seed: int | None = 0, *, model_name: str = "deit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    """timm's ``model_name`` (a ViT) shrunk by ``TINY_TIMM_KWARGS``; ``kwargs`` override them."""
    import timm  # only the tests that build a timm model pay for it

    _seed(seed)
    return timm.create_model(model_name, pretrained=False, **{**TINY_TIMM_KWARGS, **kwargs})


class KeywordDataset(torch.utils.data.Dataset):
    """Label 1 when token 7 occurs in the sequence: learnable in a few dozen steps."""

    def __init__(self, size: int = 128, length: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(8, 64, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        positions = torch.randint(0, length, (size,), generator=generator)
        self.input_ids[self.labels == 1, positions[self.labels == 1]] = 7

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


def pretrained_like(model: torch.nn.Module, decay: float = 0.7, seed: int = 123) -> torch.nn.Module:
    """Give every target Linear a fast-decaying spectrum (same Frobenius norm), as pretrained weights have:
    ``detect_pretrained`` calls such a model pretrained. Returns ``model``."""
    from cuttlefish_hf.targeting import find_targets

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in find_targets(model):
            weight = model.get_submodule(name).weight
            m, n = weight.shape
            k = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
            spectrum = torch.tensor([decay ** i for i in range(k)])
            weight.copy_((u * (spectrum * weight.norm() / spectrum.norm())) @ v.T)
    return model


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for torchrun's ``--master_port``: a fixed one would collide with any other
    test run on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
