"""The gradient noise scale of McCandlish et al. 2018 from two gradient norms per step.

Per-sample gradients have mean ``G`` and covariance ``Sigma``. The mean gradient over a batch of
``b`` samples satisfies ``E |G_b|^2 = |G|^2 + tr(Sigma) / b``, so the squared norms of a small-batch
gradient (``b`` samples) and a large-batch gradient (``B > b`` samples) of the same step give
unbiased estimates (McCandlish et al. 2018, appendix A)::

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and the *simple noise scale* ``B_simple = tr(Sigma) / |G|^2`` (in samples) estimates the batch size
beyond which larger batches stop paying off. Under Horovod ``G_b`` is a rank's local gradient
(``b`` = per-rank batch, all micro-batches of the step) and ``G_B`` the averaged one (``B`` = global
batch); the wrapper passes the mean over ranks of the local ``|G_b|^2``, which keeps the estimate
unbiased and divides the variance of that term by about the world size.

One step's estimates are very noisy (the ``|G|^2`` estimate is often negative); as McCandlish et
al. recommend, :class:`NoiseScaleEstimator` keeps exponential moving averages of the two estimates
separately and reports the ratio of the averages. Everything stays in tensors on the gradients'
device: only :meth:`NoiseScaleEstimator.value` reads a number back to the host.
"""
from __future__ import annotations

import math

import torch

from hvd_largebatch.errors import ConfigError


def unbiased_estimates(local_sq: torch.Tensor, global_sq: torch.Tensor, small_batch: float,
                       large_batch: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|G|^2, tr(Sigma))`` estimated from ``|G_b|^2`` (``local_sq``, batch ``small_batch``) and
    ``|G_B|^2`` (``global_sq``, batch ``large_batch``); both norms of *mean* gradients."""
    b, big = float(small_batch), float(large_batch)
    if not 0 < b < big:
        raise ValueError(f"need 0 < small batch < large batch (got {small_batch}, {large_batch})")
    grad_sq = (big * global_sq - b * local_sq) / (big - b)
    trace = (local_sq - global_sq) / (1.0 / b - 1.0 / big)
    return grad_sq, trace


class NoiseScaleEstimator:
    """EMAs of the ``|G|^2`` and ``tr(Sigma)`` estimates; ``B_simple`` is the ratio of the EMAs.

    ``decay``: EMA factor per update (0.99: a window of about 100 steps). The EMAs start at zero;
    the ratio needs no bias correction (it cancels), :meth:`stats` reports corrected averages.
    """

    def __init__(self, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ConfigError("noise_scale_decay", f"must be in [0, 1) (got {decay!r})")
        self.decay = float(decay)
        self.steps = 0
        self._grad_sq: torch.Tensor | None = None
        self._trace: torch.Tensor | None = None
        self._folded: torch.Tensor | None = None  # steps folded in (non-finite ones are not)
        self._last: dict[str, torch.Tensor] = {}

    def update(self, local_sq: torch.Tensor, global_sq: torch.Tensor, small_batch: float,
               large_batch: float) -> None:
        """Fold one step in: ``local_sq`` = ``|G_b|^2`` (mean over ranks), ``global_sq`` =
        ``|G_B|^2``, 0-dim tensors; ``small_batch`` = b (per-rank), ``large_batch`` = B (global).
        A step with non-finite norms (an overflow that skipped the update) leaves the averages
        as they were, decided on the device (no synchronization)."""
        grad_sq, trace = unbiased_estimates(local_sq.float(), global_sq.float(), small_batch,
                                            large_batch)
        if self._grad_sq is None:
            self._grad_sq, self._trace = torch.zeros_like(grad_sq), torch.zeros_like(trace)
            self._folded = torch.zeros_like(grad_sq)
        finite = torch.isfinite(grad_sq) & torch.isfinite(trace)
        for ema, value in ((self._grad_sq, grad_sq), (self._trace, trace)):
            ema.copy_(torch.where(finite, ema * self.decay + value * (1.0 - self.decay), ema))
        self._folded.add_(finite.to(self._folded.dtype))
        self.steps += 1
        self._last = {"local_sq": local_sq, "global_sq": global_sq, "grad_sq_step": grad_sq,
                      "trace_step": trace}

    def stats(self) -> dict[str, torch.Tensor | int]:
        """Tensors (no host synchronization): ``noise_scale`` (B_simple, samples), ``grad_sq`` and
        ``trace`` (bias-corrected EMAs over the finite steps), the last step's ``local_sq``,
        ``global_sq``, ``grad_sq_step``, ``trace_step``, and ``steps`` (int, every update). Empty
        before the first update."""
        if self._grad_sq is None:
            return {}
        correction = 1.0 - self.decay ** self._folded
        return {"noise_scale": self._trace / self._grad_sq,
                "grad_sq": self._grad_sq / correction, "trace": self._trace / correction,
                **self._last, "steps": self.steps}

    def state_dict(self) -> dict:
        """The averages and counters, on the CPU (for a checkpoint; an adaptive batch decides
        from them, so a resumed run must continue them exactly)."""
        tensors = {} if self._grad_sq is None else {
            "grad_sq": self._grad_sq.detach().cpu().clone(),
            "trace": self._trace.detach().cpu().clone(),
            "folded": self._folded.detach().cpu().clone()}
        return {"decay": self.decay, "steps": self.steps, **tensors}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Continue from ``state`` (tensors moved to ``device``); the decay stays this
        estimator's own."""
        self.steps = int(state["steps"])
        if "grad_sq" not in state:
            self._grad_sq = self._trace = self._folded = None
            return
        self._grad_sq, self._trace, self._folded = (
            state[name].to(device).clone() for name in ("grad_sq", "trace", "folded"))

    def averages(self) -> torch.Tensor | None:
        """``[tr(Sigma), |G|^2]`` averages (fp32, on the device, no synchronization; their ratio
        is ``B_simple``); None before the first update."""
        if self._grad_sq is None:
            return None
        return torch.stack([self._trace, self._grad_sq])

    def value(self) -> float | None:
        """``B_simple`` as a float (reads the device once); None before the first update or while
        the averaged ``|G|^2`` estimate is not positive (too few steps to resolve it)."""
        averages = self.averages()
        return None if averages is None else ratio(*averages.tolist())


def ratio(trace: float, grad_sq: float) -> float | None:
    """``B_simple = trace / grad_sq`` from the averages; None while ``grad_sq`` is not positive
    or ``trace`` not finite."""
    if not grad_sq > 0 or not math.isfinite(trace):
        return None
    return trace / grad_sq
