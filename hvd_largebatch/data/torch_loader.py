"""The baseline the DALI pipeline is measured against: Pillow + a torch DataLoader.

The training transform is the one torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``
+ ``ToTensor`` + ``Normalize`` chain applies (same crop-window algorithm, Pillow bilinear resize),
written here without torchvision. Batches follow the ``GlobalSampler`` (its per-iteration indices
are the DataLoader's ``batch_sampler``), so both loaders read the same samples.
"""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hvd_largebatch.data.sampler import GlobalSampler
from hvd_largebatch.data.sources import FileIndex
from hvd_largebatch.data.transforms import ImageTransform


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """Crop window (left, top, right, bottom) in pixels: area fraction in ``scale``, aspect
    ratio w/h log-uniform in ``ratio``, 10 attempts, else the central crop with the ratio
    clamped to ``ratio`` (torchvision's algorithm)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class PillowTrainDataset(Dataset):
    """Sample i -> (normalized CHW float32 tensor, label) with the training augmentation."""

    def __init__(self, index: FileIndex, transform: ImageTransform, seed: int = 0):
        self.index = index
        self.transform = transform
        self.seed = seed
        self._rng: random.Random | None = None
        self._mean = torch.tensor(transform.mean).view(3, 1, 1)
        self._std = torch.tensor(transform.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if self._rng is None:  # one generator per worker process
            info = torch.utils.data.get_worker_info()
            self._rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        t = self.transform
        image = Image.open(io.BytesIO(self.index.read(i).tobytes())).convert("RGB")
        box = random_resized_crop_box(image.width, image.height, t.scale, t.ratio, self._rng)
        image = image.resize((t.crop_size, t.crop_size), Image.Resampling.BILINEAR, box=box)
        if t.flip and self._rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        chw = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return chw.sub_(self._mean).div_(self._std), int(self.index.labels[i])


def pillow_train_loader(index: FileIndex, sampler: GlobalSampler, epoch: int,
                        transform: ImageTransform = ImageTransform(), *, num_workers: int = 2,
                        seed: int = 0) -> DataLoader:
    """A DataLoader over ``epoch`` of ``sampler`` (batches = the sampler's per-rank indices)."""
    batches = [idx.tolist() for idx in sampler.epoch(epoch)]
    return DataLoader(PillowTrainDataset(index, transform, seed), batch_sampler=batches,
                      num_workers=num_workers)
