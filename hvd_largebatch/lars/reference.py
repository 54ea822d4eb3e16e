"""The maths of :mod:`hvd_largebatch.lars.ops` in plain PyTorch, one tensor at a time.

This is the independent reference the tests hold the native kernels to, and the "per-tensor loop"
baseline of ``benchmarks/bench_lars.py``. It follows the formulas of the ops module docstring
literally (fp32 arithmetic, results rounded into the param's dtype by ``Tensor.copy_``); it is
slow (about ten kernel launches per tensor, plus a host synchronization to test for non-finite
sums) and is not meant for training.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[n]``: ``sum(t**2)`` of each tensor, computed in fp32."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack([t.float().pow(2).sum() for t in tensors])


def lars_sumsq(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, dot: bool = False):
    """``(||w||^2, ||g||^2, <w, g> or None)``, fp32 ``[n]`` each."""
    w_sq = sum_of_squares(params)
    g_sq = sum_of_squares(grads)
    wg = None
    if dot:
        wg = torch.stack([(w.float() * g.float()).sum() for w, g in zip(params, grads)])
    return w_sq, g_sq, wg


def trust_ratio(w_sq: torch.Tensor, g_sq: torch.Tensor, wg: torch.Tensor | None, *,
                weight_decay: float, trust_coefficient: float, eps: float, lars: bool,
                denominator: str) -> torch.Tensor:
    """The layer-wise trust ratio from fp32 sums (0-dim tensors), 1 where LARS does not apply;
    NaN when a sum it reads is not finite (``wg`` only for the combined denominator)."""
    one = torch.ones((), dtype=torch.float32, device=w_sq.device)
    if not lars:
        return one
    read = [w_sq, g_sq] + ([wg] if denominator == "combined" else [])
    finite = torch.isfinite(torch.stack(read)).all()
    w_norm, g_norm = w_sq.sqrt(), g_sq.sqrt()
    if denominator == "combined":
        d_sq = g_sq + weight_decay * (2 * wg + weight_decay * w_sq)
        denom = d_sq.clamp(min=0).sqrt() + eps  # rounding may make d_sq < 0; NaN stays NaN
        degenerate = (w_norm == 0) | (g_norm == 0) | (denom == 0)
    else:
        denom = g_norm + weight_decay * w_norm + eps
        degenerate = (w_norm == 0) | (g_norm == 0)
    ratio = torch.where(degenerate, one, trust_coefficient * w_norm / denom)
    return torch.where(finite, ratio, torch.full_like(one, math.nan))


def lars_update_(params, grads, momentum_buffers, w_sumsq, g_sumsq, wg_dot=None, *, lr,
                 momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
                 nesterov=False, momentum_correction=True, lars=True, denominator="separate",
                 on_nonfinite="skip"):
    """In-place update of each tensor; returns ``(trust_ratios fp32 [n], nonfinite: bool)``.

    Hyperparameters are scalars here (one group); buffers: fp32 tensors, or None when momentum is 0.
    """
    sums = [w_sumsq, g_sumsq] + ([wg_dot] if wg_dot is not None else [])
    nonfinite = not bool(torch.isfinite(torch.stack(sums)).all())
    ratios = []
    for i, (w, g) in enumerate(zip(params, grads)):
        ratios.append(trust_ratio(w_sumsq[i], g_sumsq[i], None if wg_dot is None else wg_dot[i],
                                  weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                                  eps=eps, lars=lars, denominator=denominator))
    ratios = torch.stack(ratios) if ratios else torch.zeros(0)
    if nonfinite and on_nonfinite == "skip":
        return ratios, nonfinite
    buffers = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    for w, g, buf, ratio in zip(params, grads, buffers, ratios):
        w32 = w.float()
        d = g.float() + weight_decay * w32
        if momentum_correction:  # u <- m u + r d; w <- w - lr u
            s = ratio * d
        else:  # v <- m v + lr r d; w <- w - v
            s = (lr * ratio) * d
        if momentum != 0:
            buf.mul_(momentum).add_(s)
            step = s + momentum * buf if nesterov else buf
        else:
            step = s
        w.copy_(w32 - (lr * step if momentum_correction else step))
    return ratios, nonfinite


class ReferenceLARS(torch.optim.Optimizer):
    """LARS as a plain per-tensor PyTorch loop, with FusedLARS's arguments and group keys.

    fp32 momentum buffers in ``state[p]["momentum_buffer"]``, zero-initialized; params without a
    gradient are skipped. ``last_nonfinite`` tells whether the last step met non-finite sums.
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=0.0, nesterov=False, momentum_correction=True, lars=True,
                 denominator="separate", on_nonfinite="skip"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                        momentum_correction=momentum_correction, lars=lars,
                        denominator=denominator, on_nonfinite=on_nonfinite)
        super().__init__(params, defaults)
        self.last_nonfinite = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the skip decision covers the whole step: check every group's sums first
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            dot = group["lars"] and group["denominator"] == "combined"
            work.append((group, params, grads, lars_sumsq(params, grads, dot=dot)))
        sums = [s for *_, (w_sq, g_sq, wg) in work for s in (w_sq, g_sq, wg) if s is not None]
        self.last_nonfinite = bool(sums) and not bool(torch.isfinite(torch.cat(sums)).all())
        if self.last_nonfinite and any(g["on_nonfinite"] == "skip" for g, *_ in work):
            return loss
        for group, params, grads, (w_sq, g_sq, wg) in work:
            buffers = None
            if group["momentum"] != 0:
                buffers = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    buffers.append(state["momentum_buffer"])
            hyper = {k: group[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient",
                                           "eps", "nesterov", "momentum_correction", "lars",
                                           "denominator")}
            lars_update_(params, grads, buffers, w_sq, g_sq, wg, on_nonfinite="propagate", **hyper)
        return loss
