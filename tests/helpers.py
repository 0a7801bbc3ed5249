"""Tiny models and data shared by the integration tests (offline, seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config)


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
