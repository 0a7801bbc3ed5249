"""Integrations with training frameworks (Hugging Face Trainer)."""

from .trainer import CuttlefishCallback, CuttlefishTrainer

__all__ = ["CuttlefishCallback", "CuttlefishTrainer"]
