"""The Horovod layer: ``DistributedOptimizer`` around FusedLARS (or any torch optimizer), with
replicated (``exchange``) or sharded (``sharded``, ``sharding``) gradient exchange, per-layer
sums of squares made exact across ranks, the gradient noise scale (``noise_scale``), the rank
agreement check (``consistency``) and the Horovod build check (``horovod_check``). It knows
nothing of data or training.

``DistributedOptimizer`` is loaded on first use: it imports ``horovod.torch``, which the build
check must not need.
"""

__all__ = ["DistributedOptimizer"]


def __getattr__(name):
    if name == "DistributedOptimizer":
        from hvd_largebatch.distributed.optimizer import DistributedOptimizer

        return DistributedOptimizer
    raise AttributeError(f"module 'hvd_largebatch.distributed' has no attribute {name!r}")
