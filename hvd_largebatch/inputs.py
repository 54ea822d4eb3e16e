"""The ``data:`` section of a config turned into file indexes and per-rank loaders.

``index_data`` finds the training and validation sets (sizes, class count) on one rank without
any collective, so every rank can check them before training starts; ``train_loader`` /
``val_loader`` build the DALI (or synthetic) loaders over a ``GlobalSampler``.

Layouts per ``data.source``:

* ``folder``: ``<path>/train/<class>/<image>`` and ``<path>/val/<class>/<image>``;
* ``filelist``: ``<path>/<train_list>`` and ``<path>/<val_list>``, ``path label`` lines with
  paths relative to ``<path>``;
* ``digits``: scikit-learn's digits written as a folder at ``<path>`` (default ``data/digits``)
  by ``prepare_digits`` (rank 0, 32x32 pixels) when it is not there yet, then read as a folder;
* ``synthetic``: random tensors, ``data.num_samples`` training samples (default: the schedule's
  ``dataset_size``), ``data.val_samples`` validation samples and ``data.num_classes`` classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hvd_largebatch.config import (DEFAULT_DIGITS_PATH, SYNTHETIC_CLASSES, SYNTHETIC_VAL_SAMPLES,
                                   Config, DataConfig)
from hvd_largebatch.data import (CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN,
                                 IMAGENET_STD, FileIndex, GlobalSampler, ImageTransform, StepLoader)
from hvd_largebatch.errors import ConfigError, DataError

STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
         "digits": (DIGITS_MEAN, DIGITS_STD)}


@dataclass(frozen=True)
class DataSets:
    """Training and validation sets of a run (indexes are None for synthetic data)."""

    train: FileIndex | None
    val: FileIndex | None
    num_train: int
    num_val: int
    num_classes: int


def data_root(d: DataConfig) -> str:
    """Where the data lives (``data.path``, or the default digits folder)."""
    return d.path or DEFAULT_DIGITS_PATH


def prepare_digits(d: DataConfig) -> None:
    """Write scikit-learn's digits at ``data.path`` unless a digits set (of any image size,
    e.g. from ``hvd-largebatch prepare-data --size 8``) is already there. Call on one rank."""
    from hvd_largebatch.data import write_digits_folder
    from hvd_largebatch.data.digits import MARKER

    if not os.path.exists(os.path.join(data_root(d), MARKER)):
        write_digits_folder(data_root(d))


def index_data(cfg: Config, schedule_dataset_size: int | None) -> DataSets:
    """Index the training and validation sets; DataError naming the missing folder or file.

    ``schedule_dataset_size`` is the size synthetic data takes when ``data.num_samples`` is
    not set."""
    d = cfg.data
    if d.source == "synthetic":
        n = d.num_samples or schedule_dataset_size
        if n is None:
            raise ConfigError("data.num_samples", "is required for synthetic data when the "
                              "schedule has no dataset_size")
        return DataSets(None, None, n, d.val_samples or SYNTHETIC_VAL_SAMPLES,
                        d.num_classes or cfg.model.num_classes or SYNTHETIC_CLASSES)
    root = data_root(d)
    if not os.path.isdir(root):
        raise DataError(f"{root}: data.path does not exist or is not a folder")
    if d.source == "filelist":
        train = FileIndex.from_file_list(os.path.join(root, d.train_list), root=root)
        val = FileIndex.from_file_list(os.path.join(root, d.val_list), root=root)
    else:
        train = FileIndex.from_folder(os.path.join(root, "train"))
        val = FileIndex.from_folder(os.path.join(root, "val"))
        if train.classes != val.classes:
            raise DataError(f"{root}: train/ has classes {_few(train.classes)} but val/ has "
                            f"{_few(val.classes)}; both need the same class folders")
    num_classes = cfg.model.num_classes or max(train.num_classes, val.num_classes)
    train.check_labels(num_classes)
    val.check_labels(num_classes)
    return DataSets(train, val, len(train), len(val), num_classes)


def _few(names) -> str:
    names = list(names or ())
    return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")


def image_transform(d: DataConfig, dtype: str = "float32") -> ImageTransform:
    """The pipelines' ``ImageTransform`` for this data section."""
    stats = d.stats or ("digits" if d.source == "digits" else "imagenet")
    mean, std = STATS.get(stats, (None, None))
    return ImageTransform(
        crop_size=d.image_size,
        resize_shorter=d.resize_shorter or round(d.image_size * 256 / 224),
        scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), flip=d.flip,
        mean=tuple(d.mean or mean), std=tuple(d.std or std), dtype=dtype)


def train_loader(cfg: Config, data: DataSets, sampler: GlobalSampler, *, micro_batches: int,
                 device: torch.device, dtype: str, seed: int) -> StepLoader:
    """Training loader of this rank: ``micro_batches`` micro-batches per iteration."""
    return _loader(cfg, data, data.train, sampler, micro_batches=micro_batches, device=device,
                   dtype=dtype, seed=seed, train=True)


def val_loader(cfg: Config, data: DataSets, world_size: int, rank: int, *, device: torch.device,
               dtype: str) -> StepLoader:
    """Validation loader: every sample once, ``train.eval_batch`` (default
    ``max_per_rank_batch``) per rank and iteration."""
    per_rank = cfg.train.eval_batch or cfg.train.max_per_rank_batch
    per_rank = min(per_rank, -(-data.num_val // world_size))
    sampler = GlobalSampler.for_validation(data.num_val, per_rank * world_size, world_size, rank)
    return _loader(cfg, data, data.val, sampler, micro_batches=1, device=device, dtype=dtype,
                   seed=cfg.train.seed, train=False)


def _loader(cfg: Config, data: DataSets, index: FileIndex | None, sampler: GlobalSampler, *,
            micro_batches: int, device: torch.device, dtype: str, seed: int, train: bool) -> StepLoader:
    d = cfg.data
    if d.source == "synthetic":
        from hvd_largebatch.data import SyntheticLoader

        return SyntheticLoader(sampler, image_shape=(3, d.image_size, d.image_size),
                               num_classes=data.num_classes, dtype=dtype, device=device,
                               micro_batches=micro_batches, seed=seed)
    from hvd_largebatch.data import DaliLoader

    device_id = None  # CPU pipeline; on a GPU, the rank's device (torch.device("cuda") has no index)
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    return DaliLoader(index, sampler, image_transform(d, dtype), train=train, device_id=device_id,
                      num_threads=d.workers, micro_batches=micro_batches,
                      prefetch_depth=d.prefetch, seed=seed, skip_bad_files=d.skip_bad_files)
