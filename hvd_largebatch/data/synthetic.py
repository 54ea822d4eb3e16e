"""Synthetic input: random images with no decoding, for throughput and scaling measurements.

It follows the sampler exactly like the DALI loader (same iterations, batch sizes, micro-batches
and resume position), so a synthetic run has the schedule's batch sizes and step counts.
"""
from __future__ import annotations

import torch

from hvd_largebatch.data.sampler import GlobalSampler
from hvd_largebatch.data.step_loader import TORCH_DTYPES, StepLoader
from hvd_largebatch.errors import ConfigError


#: distinct random images a synthetic loader holds; sample i shows image ``i % POOL``
POOL = 64


class SyntheticLoader(StepLoader):
    """Yields ``(images, labels)`` per micro-batch without touching any file.

    Sample ``i`` is image ``i % POOL`` of ``POOL`` random N(0, 1) images made once from ``seed``
    and labelled ``i % num_classes`` (int64): a pure function of (seed, sample index), so the
    global batch of every iteration holds the same tensors on any world size and after a
    resume. Both live on ``device``; each batch is a new tensor (a gather from the pool), in
    ``dtype`` and, with ``channels_last``, in NHWC memory seen as NCHW (as the DALI loader's).
    """

    def __init__(self, sampler: GlobalSampler, *, image_shape: tuple[int, int, int] = (3, 224, 224),
                 num_classes: int = 1000, dtype: str = "float32", device: str | torch.device = "cpu",
                 micro_batches: int = 1, seed: int = 0, channels_last: bool = False):
        super().__init__(sampler, micro_batches)
        if dtype not in TORCH_DTYPES:
            raise ConfigError("data.dtype", f"must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
        if num_classes < 1:
            raise ConfigError("model.num_classes", f"must be >= 1, got {num_classes}")
        generator = torch.Generator().manual_seed(int(seed))
        images = torch.randn((POOL, *image_shape), generator=generator)
        self.device = torch.device(device)
        self.num_classes = int(num_classes)
        self.channels_last = channels_last
        if channels_last:  # the pool in NHWC memory: a gather of it stays NHWC
            images = images.permute(0, 2, 3, 1).contiguous()
        self._images = images.to(device=self.device, dtype=TORCH_DTYPES[dtype])

    def _produce(self, items):
        for item in items:
            rows = torch.from_numpy(item.indices % POOL).to(self.device)
            labels = torch.from_numpy(item.indices % self.num_classes).to(self.device)
            batch = self._images.index_select(0, rows)
            yield item, (batch.permute(0, 3, 1, 2) if self.channels_last else batch, labels)
