"""The baseline the DALI pipeline is measured against: Pillow + a torch DataLoader.

The training transform is the one torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``
+ ``ToTensor`` + ``Normalize`` chain applies (same crop-window algorithm, Pillow bilinear resize),
written here without torchvision, with the windows and flips of ``hvd_largebatch.data.augment``. Batches follow the ``GlobalSampler`` (its per-iteration indices
are the DataLoader's ``batch_sampler``), so both loaders read the same samples.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hvd_largebatch.data.augment import training_augmentation
from hvd_largebatch.data.sampler import GlobalSampler
from hvd_largebatch.data.sources import FileIndex
from hvd_largebatch.data.transforms import ImageTransform


class PillowTrainDataset(Dataset):
    """Sample i of ``epoch`` -> (normalized CHW float32 tensor, label) with the training
    augmentation of ``hvd_largebatch.data.augment`` (the crop window and flip the DALI loader
    uses for the same (seed, epoch, sample))."""

    def __init__(self, index: FileIndex, transform: ImageTransform, epoch: int, seed: int = 0):
        self.index = index
        self.transform = transform
        self.epoch = epoch
        self.seed = seed
        self._mean = torch.tensor(transform.mean).view(3, 1, 1)
        self._std = torch.tensor(transform.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        t = self.transform
        image = Image.open(io.BytesIO(self.index.read(i).tobytes())).convert("RGB")
        aug = training_augmentation(self.seed, self.epoch, np.array([i]), np.array([image.width]),
                                    np.array([image.height]), t.scale, t.ratio, t.flip)
        left, top = int(aug.left[0]), int(aug.top[0])
        box = (left, top, left + int(aug.width[0]), top + int(aug.height[0]))
        image = image.resize((t.crop_size, t.crop_size), Image.Resampling.BILINEAR, box=box)
        if aug.flip[0]:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        chw = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return chw.sub_(self._mean).div_(self._std), int(self.index.labels[i])


def pillow_train_loader(index: FileIndex, sampler: GlobalSampler, epoch: int,
                        transform: ImageTransform = ImageTransform(), *, num_workers: int = 2,
                        seed: int = 0) -> DataLoader:
    """A DataLoader over ``epoch`` of ``sampler`` (batches = the sampler's per-rank indices)."""
    batches = [idx.tolist() for idx in sampler.epoch(epoch)]
    return DataLoader(PillowTrainDataset(index, transform, epoch, seed), batch_sampler=batches,
                      num_workers=num_workers)
