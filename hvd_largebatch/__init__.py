"""hvd-largebatch: large-batch image-model training over Horovod (Goyal 2017, LARS, Smith 2017)."""

from .build import build_info

__all__ = ["build_info"]

# FusedLARS and param_groups import torch: loaded on first use so that `import hvd_largebatch` stays
# light.
_LAZY_OPTIM = ("FusedLARS", "param_groups")
__all__ += list(_LAZY_OPTIM)
# DistributedOptimizer imports horovod: only on first use
__all__ += ["DistributedOptimizer"]


def __getattr__(name):
    if name in _LAZY_OPTIM:
        from . import optim

        return getattr(optim, name)
    if name == "DistributedOptimizer":
        from .distributed import DistributedOptimizer

        return DistributedOptimizer
    raise AttributeError(f"module 'hvd_largebatch' has no attribute {name!r}")
