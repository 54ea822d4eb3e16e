"""Replicated gradient exchange: Horovod allreduce per parameter, LARS norms of the averaged grads.

:class:`ExchangeConfig` holds the Horovod settings both modes share (compression, op, pre/post
scale factors). :class:`ReplicatedExchange` is the default mode of
:class:`hvd_largebatch.distributed.DistributedOptimizer`:

* each parameter's gradient is allreduced asynchronously, in place, as soon as autograd has
  accumulated it for the last time (``backward_passes_per_step``), so Horovod's tensor fusion
  batches the small ones and the exchange overlaps the rest of the backward pass. When the noise
  scale is measured, the local gradient's squared norm is taken just before (one reduction per
  tensor, during backward);
* while the exchange is in flight, one fused pass computes every layer's ``||w||^2`` (which does
  not depend on the gradients), and the local squared norms are summed and averaged over ranks
  with a one-element allreduce;
* after it, one fused pass computes ``||g||^2`` (and ``<w, g>``) of the *averaged* gradients, and
  the update runs with those sums (:meth:`FusedLARS.step_with_sumsq
  <hvd_largebatch.lars.optimizer.FusedLARS.step_with_sumsq>`). Every rank holds the same averaged gradient,
  so every rank computes the same norms: no further communication.

Plain torch optimizers (no ``step_with_sumsq``) are stepped after the exchange, like Horovod's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import horovod.torch as hvd
import torch

from hvd_largebatch.lars import ops


@dataclass(frozen=True)
class ExchangeConfig:
    """Horovod settings of the gradient exchange (see ``hvd.DistributedOptimizer``).

    ``op``: ``hvd.Average`` or ``hvd.Sum``. ``predivide``: ``gradient_predivide_factor`` (Average
    only: gradients are scaled by ``1 / f`` before the sum and ``f / size`` after it).
    """

    compression: Any
    op: int
    predivide: float
    sparse_as_dense: bool
    size: int

    @property
    def scale_factors(self) -> dict:
        if self.op == hvd.Average:
            return {"prescale_factor": 1.0 / self.predivide, "postscale_factor": self.predivide}
        return {}

    @property
    def local_mean_factor(self) -> float:
        """What a rank's gradient is multiplied by to be the mean gradient of its own samples.

        With ``op=Average`` each rank's loss is a mean over its samples (factor 1). With ``op=Sum``
        each rank's loss is its samples' sum divided by the *global* batch, so that the sum over
        ranks is the global mean; a rank's own mean is then ``size`` times its gradient.
        """
        return float(self.size) if self.op == hvd.Sum else 1.0


def dense_grad(p: torch.Tensor, name: str, sparse_as_dense: bool) -> torch.Tensor:
    """``p.grad`` (zeros if it is None: another rank may have one), densified when allowed."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    elif p.grad.is_sparse:
        if not sparse_as_dense:
            raise ValueError(f"parameter {name!r} has a sparse gradient; LARS needs dense "
                             "gradients: pass sparse_as_dense=True")
        p.grad = p.grad.to_dense()
    return p.grad


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim fp32 tensor: the squared 2-norm of all tensors together, on their device."""
    tensors = list(tensors)
    if all(t.dtype in ops.DTYPE_CODES for t in tensors):
        return ops.sum_of_squares(tensors).sum()
    return torch.stack([t.detach().float().pow(2).sum() for t in tensors]).sum()


class ReplicatedExchange:
    """Allreduce of every gradient, norms of the averaged gradients, update on every rank.

    ``optimizer``: the wrapped optimizer; ``names``: parameter -> Horovod tensor name;
    ``params``: the parameters to exchange (those with ``requires_grad``), in a fixed order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict, params: list,
                 config: ExchangeConfig):
        self.optimizer = optimizer
        self.names = names
        self.params = params
        self.config = config
        self.lars = hasattr(optimizer, "step_with_sumsq")
        self.handles: dict = {}
        self._w_sumsq: torch.Tensor | None = None
        self._local_parts: list[torch.Tensor] = []
        self._local_handle = None

    @property
    def state(self):
        return self.optimizer.state

    @property
    def in_flight(self) -> bool:
        return bool(self.handles)

    def grad_ready(self, p: torch.Tensor, measure_noise: bool) -> None:
        """Start ``p``'s allreduce (its gradient is final for this step)."""
        name = self.names[p]
        grad = dense_grad(p, name, self.config.sparse_as_dense)
        if measure_noise:
            self._local_parts.append(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
        compressed, ctx = self.config.compression.compress(grad)
        handle = hvd.allreduce_async_(compressed, name=f"hvdlb.grad.{name}", op=self.config.op,
                                      **self.config.scale_factors)
        self.handles[p] = (handle, ctx)

    def synchronize(self, measure_noise: bool, weight_sums: bool = True) -> None:
        """Start the allreduces backward did not start, take the sums that do not need the
        averaged gradients while they are in flight (``weight_sums``: the weights' squares, for
        :meth:`step`), then put those into ``p.grad``."""
        for p in self.params:
            if p not in self.handles:
                self.grad_ready(p, measure_noise)
        # (every gradient has its local norm unless measuring was turned on mid-step)
        if measure_noise and len(self._local_parts) == len(self.params):
            local_sq = torch.stack(self._local_parts).sum() * self.config.local_mean_factor ** 2
            self._local_handle = hvd.allreduce_async(local_sq.reshape(1), op=hvd.Average,
                                                     name="hvdlb.noise.local_sq")
        self._local_parts = []
        if weight_sums and self.lars and self.params:  # every trainable parameter has a gradient
            self._w_sumsq = self.optimizer.compute_sumsq(weights=True, grads=False).w_sumsq
        for p, (handle, ctx) in self.handles.items():
            p.grad.set_(self.config.compression.decompress(hvd.synchronize(handle), ctx))
        self.handles.clear()

    def step(self, measure_noise: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update on the averaged gradients; returns ``(mean local |G_b|^2, |G_B|^2)`` when
        ``measure_noise``."""
        opt = self.optimizer
        global_sq = None
        if not self.lars:
            if measure_noise:
                global_sq = squared_norm([p.grad for p in self.params])
            opt.step()
        elif self.params:
            w_sumsq = self._w_sumsq
            if w_sumsq is None:  # synchronize() did not run (skip_synchronize() without it)
                w_sumsq = opt.compute_sumsq(weights=True, grads=False).w_sumsq
            sums = opt.compute_sumsq(weights=False, grads=True)
            opt.step_with_sumsq(w_sumsq, sums.g_sumsq, sums.wg_dot)
            if measure_noise:
                global_sq = sums.g_sumsq.sum()
        self._w_sumsq = None
        handle, self._local_handle = self._local_handle, None
        if handle is None:
            return None
        local_sq = hvd.synchronize(handle)[0]
        return None if global_sq is None else (local_sq, global_sq)
