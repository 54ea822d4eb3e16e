"""hvd-largebatch: large-batch image-model training over Horovod (Goyal 2017, LARS, Smith 2017).

Layers (imports point down only): ``cli`` -> ``training`` -> ``distributed`` -> ``lars``; each may
use ``schedules``, ``data``, ``models`` and ``errors``, which use none of them.

The public surface, loaded on first use so that ``import hvd_largebatch`` needs neither torch
nor Horovod: ``FusedLARS``, ``param_groups`` and ``ops`` (``hvd_largebatch.lars``),
``DistributedOptimizer`` (``hvd_largebatch.distributed``, imports Horovod), ``schedules``,
``data``; ``build_info()`` says what the native modules were built with.
"""
import importlib

from hvd_largebatch.lars.native import build_info

#: public name -> the module that holds it (a module itself when the attribute is None)
_LAZY = {
    "FusedLARS": ("hvd_largebatch.lars.optimizer", "FusedLARS"),
    "param_groups": ("hvd_largebatch.lars.optimizer", "param_groups"),
    "DistributedOptimizer": ("hvd_largebatch.distributed.optimizer", "DistributedOptimizer"),
    "ops": ("hvd_largebatch.lars.ops", None),
    "schedules": ("hvd_largebatch.schedules", None),
    "data": ("hvd_largebatch.data", None),
}
__all__ = ["build_info", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'hvd_largebatch' has no attribute {name!r}")
