"""Input data: the global exact-once sampler, file indexes, DALI and synthetic loaders.

``GlobalSampler`` decides which samples every rank reads at every iteration (one permutation per
epoch, sliced by the schedule's global batch, independent of the world size);
``DaliLoader`` / ``SyntheticLoader`` turn its indices into ``(images, labels)`` torch tensors.
DALI itself is imported only when a ``DaliLoader`` is built. ``torch_loader`` holds the Pillow
baseline used by ``benchmarks/bench_data.py``.
"""
from hvd_largebatch.data.dali_loader import DaliLoader
from hvd_largebatch.data.digits import write_digits_folder
from hvd_largebatch.data.sampler import (
    FixedBatchSchedule,
    GlobalSampler,
    split_micro_batches,
)
from hvd_largebatch.data.sources import IMAGE_EXTENSIONS, FileIndex
from hvd_largebatch.data.step_loader import StepLoader
from hvd_largebatch.data.synthetic import SyntheticLoader
from hvd_largebatch.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DIGITS_MEAN", "DIGITS_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "DaliLoader", "FileIndex", "FixedBatchSchedule", "GlobalSampler",
    "ImageTransform", "StepLoader", "SyntheticLoader", "split_micro_batches", "write_digits_folder",
]
