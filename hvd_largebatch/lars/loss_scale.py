"""Dynamic loss scaling for fp16 training, held on the device and fused with FusedLARS.

fp16 gradients underflow: the loss is multiplied by a scale S before ``backward()`` so that the
gradients hold S times their true value. :class:`DynamicLossScale` keeps S as a 0-dim fp32 tensor
on the params' device; ``FusedLARS(..., loss_scale=scaler)`` then

* takes its norm pass on the scaled gradients (``||S g||^2``: no separate unscale pass over the
  gradients, unlike ``torch.amp.GradScaler.unscale_``);
* folds the unscale into the update (the kernels read S and use ``g = stored / S`` in the trust
  ratio and the element update; S is a power of two, so this is exact);
* skips the step when a sum is not finite (an overflow), which in a distributed step covers
  every rank: the sums are those of the allreduced gradients;
* updates S after every step: halved after a skipped step, doubled after ``growth_interval``
  clean steps in a row, as ``torch.amp.GradScaler`` does (the same ``torch._amp_update_scale_``
  op), all on the device: no host synchronization.

Usage::

    scaler = DynamicLossScale(device)
    opt = FusedLARS(groups, lr=..., loss_scale=scaler)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = criterion(model(x), y)
    scaler.scale_loss(loss).backward()
    opt.step()            # unscales, skips on overflow, updates the scale

Units: S is a plain factor; ``growth_interval`` counts optimizer steps (updates).
"""
from __future__ import annotations

import torch

from hvd_largebatch.errors import ConfigError


class DynamicLossScale:
    """The loss scale S and its growth counter, on ``device`` (see the module docstring).

    ``init_scale``, ``growth_factor`` and ``backoff_factor`` should be powers of two (the
    defaults are ``torch.amp.GradScaler``'s: 2^16, 2, 0.5), so that unscaling is exact.
    """

    def __init__(self, device: torch.device | str = "cpu", init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not init_scale > 0:
            raise ConfigError("init_scale", f"must be > 0 (got {init_scale!r})")
        if not growth_factor > 1:
            raise ConfigError("growth_factor", f"must be > 1 (got {growth_factor!r})")
        if not 0 < backoff_factor < 1:
            raise ConfigError("backoff_factor", f"must be in (0, 1) (got {backoff_factor!r})")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ConfigError("growth_interval", f"must be an int >= 1 (got {growth_interval!r})")
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = growth_interval
        #: S, read by the kernels when they run
        self.scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        #: clean steps in a row since S last changed
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S`` (call ``backward()`` on this)."""
        return loss * self.scale.to(loss.dtype)

    def update(self, nonfinite: torch.Tensor) -> None:
        """After a step: ``nonfinite`` (any-shape int / bool / float tensor on S's device, non-zero
        when the step met non-finite sums and was skipped) halves S, else counts a clean step."""
        found = nonfinite.reshape(-1)[:1].to(torch.float32)
        torch._amp_update_scale_(self.scale, self.growth_tracker, found, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone(),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        """Copies into the same tensors (kernels and captured graphs keep their addresses)."""
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
