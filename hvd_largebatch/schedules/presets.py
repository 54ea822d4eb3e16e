"""The papers' schedules as ``schedule:`` recipes (read by ``from_config``; ``preset(name)``).

Numbers from /work/shared/reference/papers.md. ``workers`` is the number of ranks a recipe
assumes (the paper's where stated, otherwise this project's choice, said in ``source``); global
batches are divisible by it.

- ``goyal_1h``: Goyal et al. 2017, ResNet-50 on ImageNet in 1 hour. Global batch 8192 on 256
  workers (32 per worker), lr 0.1 x 8192/256 = 3.2, gradual warmup from 0.1 over 5 epochs,
  lr x0.1 at epochs 30, 60, 80, Nesterov momentum 0.9, 90 epochs (14,075 updates in the papers'
  epochs x N / B count).
- ``smith_30min``: Smith et al. 2017, ResNet-50 "in under 30 minutes": batch 8192, raised to
  16384 after epoch 30. RECONSTRUCTION (the paper's exact recipe is unconfirmed): Goyal's
  recipe on 256 workers where the first lr drop (/10 at epoch 30) becomes batch x2 with lr / 5
  (the same /10 in noise scale) and the drops at 60 and 80 stay lr / 10: exactly Smith's
  conversion capped at 16384 (``batch_increase.max_batch``).
- ``lars_32k``: You et al. 2017 (LARS), ResNet-50 at batch 32768: gamma_0 = 40, 12 warmup
  epochs, polynomial decay of power 2 to 0, 100 epochs, momentum 0.9. The paper does not state
  the warmup's starting lr (0 here, as MLPerf LARS implementations do) nor the worker count
  (256 here, 128 per worker); the decay runs over the epochs after the warmup.
- ``smith_wrn_*``: Smith et al. 2017, Wide ResNet 16-4 on CIFAR-10 (N = 50,000), 200 epochs,
  steps at 60, 120, 160 (the standard WRN epochs; unconfirmed for this paper, but the update
  counts agree), factor 5, batch cap 5120. All four share the reference point lr 0.1 at
  batch 128 and momentum 0.9 and move from it by Smith's rules (B ~ lr, B ~ 1 / (1 - m)):
  ``original`` (B 128, lr / 5 per step, 78,125 updates), ``increasing_batch`` (B x5 per step
  up to 5120, then lr takes the rest: 29,141), ``increased_lr`` (B0 640, lr0 0.5: 6,406),
  ``increased_momentum`` (B0 3200, m 0.98, lr0 0.5: 2,305). Worker count not stated by the
  paper: 8 here (one node; every batch divides by 8).
"""
from __future__ import annotations

IMAGENET_TRAIN_SIZE = 1_281_167
CIFAR10_TRAIN_SIZE = 50_000

_GOYAL_1H = {
    "name": "goyal_1h",
    "source": "Goyal et al. 2017, arXiv 1706.02677 (ResNet-50, ImageNet in 1 hour; 256 P100)",
    "workers": 256,
    "dataset_size": IMAGENET_TRAIN_SIZE,
    "epochs": 90,
    "batch": 8192,
    "base_lr": 0.1,
    "base_batch": 256,
    "momentum": 0.9,
    "nesterov": True,
    "warmup": {"epochs": 5, "mode": "gradual"},
    "decay": {"type": "step", "milestones": [30, 60, 80], "factor": 0.1},
}

_SMITH_30MIN = {
    **_GOYAL_1H,
    "name": "smith_30min",
    "source": "Smith et al. 2017, arXiv 1711.00489 (ResNet-50 in under 30 minutes); "
              "reconstruction on Goyal's 256-worker recipe, unconfirmed",
    "batch_increase": {"max_batch": 16384},
}

_LARS_32K = {
    "name": "lars_32k",
    "source": "You, Gitman, Ginsburg 2017, arXiv 1708.03888 (LARS, ResNet-50 at 32K, 72.5% "
              "top-1); warmup start lr and 256 workers are this project's choice",
    "workers": 256,
    "dataset_size": IMAGENET_TRAIN_SIZE,
    "epochs": 100,
    "batch": 32768,
    "lr": 40.0,
    "momentum": 0.9,
    "warmup": {"epochs": 12, "mode": "gradual", "start_lr": 0.0},
    "decay": {"type": "poly", "power": 2.0, "end_lr": 0.0},
}

_SMITH_WRN = {
    "source": "Smith et al. 2017, arXiv 1711.00489 (Wide ResNet 16-4, CIFAR-10); step epochs "
              "60/120/160 and 8 workers are this project's reading, unconfirmed",
    "workers": 8,
    "dataset_size": CIFAR10_TRAIN_SIZE,
    "epochs": 200,
    "batch": 128,
    "base_lr": 0.1,
    "base_batch": 128,
    "base_momentum": 0.9,
    "momentum": 0.9,
    "decay": {"type": "step", "milestones": [60, 120, 160], "factor": 0.2},
}
_WRN_CAP = {"batch_increase": {"max_batch": 5120}}

#: preset name -> ``schedule:`` recipe (``from_config`` copies it before use).
PRESETS: dict[str, dict] = {
    "goyal_1h": _GOYAL_1H,
    "smith_30min": _SMITH_30MIN,
    "lars_32k": _LARS_32K,
    "smith_wrn_original": {**_SMITH_WRN, "name": "smith_wrn_original"},
    "smith_wrn_increasing_batch": {**_SMITH_WRN, **_WRN_CAP,
                                   "name": "smith_wrn_increasing_batch"},
    "smith_wrn_increased_lr": {**_SMITH_WRN, **_WRN_CAP, "batch": 640,
                               "name": "smith_wrn_increased_lr"},
    "smith_wrn_increased_momentum": {**_SMITH_WRN, **_WRN_CAP, "batch": 3200, "momentum": 0.98,
                                     "name": "smith_wrn_increased_momentum"},
}
