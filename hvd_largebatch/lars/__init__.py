"""The LARS layer: FusedLARS (a ``torch.optim.Optimizer``), the native ops over tensor tables and
their plain-PyTorch reference. It knows nothing of Horovod, data or training.

* ``optimizer``: ``FusedLARS``, ``param_groups``;
* ``ops``: ``sum_of_squares``, ``lars_sumsq``, ``lars_update_`` and ``TensorTable`` over the
  native modules ``hvd_largebatch._C`` (C++/OpenMP) and ``_C_cuda`` (CUDA);
* ``reference``: the same maths in PyTorch, the tests' oracle;
* ``native``: ``build_info()``, what the native modules were built with;
* ``loss_scale``: ``DynamicLossScale``, fp16 loss scaling fused into the FusedLARS step.

``FusedLARS``, ``param_groups`` and ``DynamicLossScale`` are loaded on first use (they import
torch).
"""
from hvd_largebatch.lars.native import build_info

__all__ = ["FusedLARS", "param_groups", "DynamicLossScale", "build_info"]


def __getattr__(name):
    if name in ("FusedLARS", "param_groups"):
        from hvd_largebatch.lars import optimizer

        return getattr(optimizer, name)
    if name == "DynamicLossScale":
        from hvd_largebatch.lars.loss_scale import DynamicLossScale

        return DynamicLossScale
    raise AttributeError(f"module 'hvd_largebatch.lars' has no attribute {name!r}")
