"""Config mappings shared by tests that train on the session's digits fixture."""
from __future__ import annotations

from pathlib import Path


def small_digits_config(digits: Path, out: Path, max_per_rank_batch: int = 64) -> dict:
    """One epoch of the smallest ResNet on 8x8 digits at global batch 64, quiet outputs."""
    return {
        "model": {"name": "small_resnet", "options": {"width": 4, "blocks": 1}},
        "data": {"source": "digits", "path": str(digits), "image_size": 8, "resize_shorter": 8,
                 "workers": 1},
        "schedule": {"epochs": 1, "batch": 64, "lr": 0.05},
        "train": {"max_per_rank_batch": max_per_rank_batch, "log_every": 10},
        "output": {"dir": str(out), "progress": False, "plots": False, "tensorboard": False},
    }
