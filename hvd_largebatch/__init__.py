"""hvd-largebatch: large-batch image-model training over Horovod (Goyal 2017, LARS, Smith 2017)."""

from .build import build_info

__all__ = ["build_info"]
