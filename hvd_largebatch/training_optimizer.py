"""The ``optimizer:`` section turned into the trainer's distributed optimizer.

Both optimizers are :class:`~hvd_largebatch.optim.FusedLARS`: ``lars`` with layer-wise trust
ratios, ``sgd`` with ``lars=False`` in every group, i.e. momentum SGD in the torch form
(``u <- m u + (g + wd w); w <- w - lr u``, Goyal et al.'s momentum correction when the lr
changes), so that both can run with sharded optimizer state. With ``exclude_bn_and_bias``
(``optim.param_groups``) BN parameters and biases get no weight decay and no LARS adaptation.
The lr and momentum given here are the first iteration's; the trainer sets both in every param
group before every step.

The wrapper is :class:`hvd_largebatch.DistributedOptimizer` with gradients *summed* over ranks
(``op=hvd.Sum``): the trainer divides each micro-batch's summed loss by the global batch, so the
sum is the exact mean gradient of the global batch; LARS norms are taken on it.
"""
from __future__ import annotations

import torch

from hvd_largebatch.config import Config
from hvd_largebatch.optim import FusedLARS, param_groups


def build_optimizer(cfg: Config, model: torch.nn.Module, schedule, point, micro_batches: int, hvd):
    """The wrapped optimizer for the run's first iteration ``point`` (a ``SchedulePoint``) with
    ``micro_batches`` backward passes per step."""
    from hvd_largebatch.distributed import DistributedOptimizer

    o = cfg.optimizer
    nesterov = schedule.nesterov if o.nesterov is None else o.nesterov
    opt = FusedLARS(param_groups(model, o.weight_decay, o.exclude_bn_and_bias),
                    lr=point.lr, momentum=point.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.trust_coefficient, eps=o.eps, nesterov=nesterov,
                    lars=o.name == "lars")
    wrapped = DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   backward_passes_per_step=micro_batches, op=hvd.Sum,
                                   shard_optimizer_state=o.shard_optimizer_state,
                                   global_batch=point.global_batch)
    return wrapped
