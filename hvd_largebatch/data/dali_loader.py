"""The PyTorch-facing DALI iterator: sampler indices -> encoded files -> DALI -> torch tensors.

The loader reads the files of each micro-batch itself (in the DALI ``external_source`` callback,
in iteration order), so it always knows which samples every DALI output holds: labels come
straight from the index, and a failure is attributed to a file.

Training augmentation is drawn here, on the host, per sample: ``hvd_largebatch.data.augment``
gives each sample's crop window and flip from (seed, epoch, sample index) and the image size
read from its header, and the pipeline decodes exactly that window. So the pixels of a sample do
not depend on the rank, the world size, the micro-batching, DALI's seed or the batches produced
before: the global batch of every iteration is bitwise the same on any world size and after a
resume.

These checks are the last line: a training run first checks every file once
(``hvd_largebatch.data.check``, ``data.check_files``) and leaves unusable ones out of the index
before any rank decodes anything.

Bad input (``DataError``, raised in the reading rank; the trainer turns it into a job abort so
that the other ranks do not wait forever in their next allreduce):

* a missing, unreadable or empty file, or one whose image header Pillow cannot parse (training
  reads every header on the host to draw the crop window): ``DataError`` naming it, raised while
  reading ahead (up to ``prefetch_depth`` micro-batches before the one that holds it is due);
* an image DALI cannot decode: DALI reports the batch; the loader re-checks the batch's files
  with Pillow and raises ``DataError`` naming the corrupt one(s).

A device failure (a CUDA error, out of memory, the decoder engine failing) is not the data's
fault: it raises ``DeviceError`` naming the device and DALI's message, without re-reading files.

With ``skip_bad_files=True`` such samples are dropped from their micro-batch instead (the batch
is one sample smaller on that rank), logged once as a warning and recorded in ``skipped``
(sample index -> reason); a decoding failure costs a pipeline rebuild.

Reading happens on the calling thread while DALI's threads decode earlier batches. It costs
~25 us per 100 KB file from the page cache, 2-2.5% of the CPU pipeline's time per image on the
benchmark machine (``benchmarks/bench_data.py``), so parallel external_source worker processes
would gain at most that and would compete with DALI's threads for the cores; they are not used.

Lifetime: the pipeline holds its ``external_source`` callback, which refers to the loader only
weakly, so a dropped loader frees its pipeline (GPU decoder memory, pinned buffers, streams,
threads) at once, without waiting for a garbage collection; ``close()`` frees it explicitly.
"""
from __future__ import annotations

import io
import logging
import os
import re
import weakref
from collections import deque
from typing import Iterator

import numpy as np
import torch

from hvd_largebatch.data.augment import training_augmentation
from hvd_largebatch.data.check import image_size
from hvd_largebatch.data.sampler import GlobalSampler
from hvd_largebatch.data.sources import FileIndex
from hvd_largebatch.data.step_loader import TORCH_DTYPES, StepLoader, WorkItem
from hvd_largebatch.data.transforms import ImageTransform
from hvd_largebatch.errors import ConfigError, DataError, DeviceError

log = logging.getLogger(__name__)


# DALI messages that mean the device failed, not the file: CUDA runtime / driver errors, allocation
# failures, nvJPEG / nvImageCodec failures that are not about the bitstream
_DEVICE_FAILURE = re.compile(
    r"CUDA error|cudaError\w*|CUDA_ERROR_\w+|out of memory|bad_alloc|CUDA allocation failed|"
    r"illegal memory access|no CUDA-capable device|NVJPEG_STATUS_(?:ALLOCATOR_FAILURE|"
    r"EXECUTION_FAILED|INTERNAL_ERROR|ARCH_MISMATCH|NOT_INITIALIZED)|"
    r"NVIMGCODEC_STATUS_(?:ALLOCATOR_FAILURE|EXECUTION_FAILED|INTERNAL_ERROR|ARCH_MISMATCH)",
    re.IGNORECASE)


def device_failure(message: str) -> str | None:
    """The part of a DALI error message that says a device failed, or None (then the data may
    be at fault)."""
    found = _DEVICE_FAILURE.search(message)
    return found.group(0) if found else None


def _line_with(message: str, part: str) -> str:
    """The line of a (multi-line) DALI message that holds ``part``."""
    return next(line.strip() for line in message.splitlines() if part in line)


def _weak_source(loader: "DaliLoader"):
    """The external_source callback: the loader's ``_next_encoded`` through a weak reference, so
    that the pipeline does not keep its loader (and itself, through the loader) alive."""
    method = weakref.WeakMethod(loader._next_encoded)

    def source() -> list[np.ndarray]:
        bound = method()
        if bound is None:
            raise RuntimeError("the DaliLoader feeding this pipeline has been closed")
        return bound()

    return source


def _pillow_decode_error(data: np.ndarray) -> str | None:
    """Why Pillow cannot decode ``data``, or None if it can (used only after DALI failed)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the answer
        return f"{type(e).__name__}: {e}"
    return None


class DaliLoader(StepLoader):
    """Training or validation images of one rank, decoded and augmented by DALI.

    Args:
        index: the files and labels (``FileIndex``), shared across epochs.
        sampler: this rank's ``GlobalSampler`` over ``index`` (a validation sampler for
            ``train=False``: ``GlobalSampler.for_validation``).
        transform: sizes, augmentation, statistics, output dtype.
        train: random resized crop + flip, else resize + center crop.
        device_id: None for a CPU-only pipeline and CPU tensors; a CUDA device ordinal for GPU
            decoding and CUDA tensors.
        num_threads: DALI worker threads (default: the cores this process may use, at most 4).
        micro_batches: micro-batches per iteration (gradient accumulation).
        prefetch_depth: micro-batches DALI prepares ahead of the consumer.
        seed: the augmentation seed: each training sample's crop window and flip are a pure
            function of (seed, epoch, sample index), the same on every rank and world size.
        skip_bad_files: drop unreadable / undecodable samples instead of raising DataError.

    The pipeline is built once for the largest micro-batch of the schedule and fed smaller or
    larger ones as the schedule changes, so a batch-size change costs no rebuild.

    The loader advances ``sampler``'s position: give each loader its own sampler (to read a
    validation set again, ``sampler.seek(0, 0)`` or ask for another epoch number).
    """

    def __init__(self, index: FileIndex, sampler: GlobalSampler,
                 transform: ImageTransform = ImageTransform(), *, train: bool = True,
                 device_id: int | None = None, num_threads: int | None = None,
                 micro_batches: int = 1, prefetch_depth: int = 2, seed: int = 0,
                 skip_bad_files: bool = False):
        super().__init__(sampler, micro_batches)
        if len(index) != sampler.num_samples:
            raise ConfigError("data.num_samples",
                              f"the sampler is for {sampler.num_samples} samples but "
                              f"{index.source} has {len(index)}")
        if prefetch_depth < 1:
            raise ConfigError("data.prefetch_depth", f"must be >= 1, got {prefetch_depth}")
        self.index = index
        self.transform = transform
        self.train = bool(train)
        self.device_id = device_id
        self.num_threads = num_threads or min(4, len(os.sched_getaffinity(0)))
        self.prefetch_depth = int(prefetch_depth)
        self.skip_bad_files = bool(skip_bad_files)
        self.skipped: dict[int, str] = {}
        self.seed = int(seed)
        self._items: Iterator[WorkItem] | None = None
        self._pending: deque[WorkItem] = deque()  # handed to DALI, output not yet taken
        self._refeed: deque[WorkItem] = deque()  # to hand to DALI again after a rebuild
        self._pipe = self._build()
        self._idle = True  # no epoch in flight: the pipeline can start one

    @property
    def device(self) -> str:
        """Where DALI runs the augmentations and the batches land: ``cpu`` or ``cuda:<id>``."""
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def close(self) -> None:
        """Free the DALI pipeline now (its threads, buffers and, on a GPU, decoder memory and
        streams). The loader cannot produce batches afterwards; closing twice is harmless."""
        self._pipe = None
        self._pending.clear()
        self._refeed.clear()
        self._items = None

    # -- DALI side ----------------------------------------------------------------------------
    def _build(self):
        from hvd_largebatch.data.pipelines import build_pipeline

        return build_pipeline(_weak_source(self), self.transform, train=self.train,
                              batch_size=self.max_micro_batch(), device_id=self.device_id,
                              num_threads=self.num_threads, seed=self.seed % 2**31,
                              prefetch_depth=self.prefetch_depth)

    def _next_encoded(self):
        """external_source callback: the encoded files of the next non-empty micro-batch (and,
        for training, their crop windows and flips: ``hvd_largebatch.data.augment``).

        DALI refuses empty batches, so micro-batches left with no sample (a partial last batch
        on more ranks than samples, or every sample skipped) are queued without a DALI run."""
        while True:
            item = self._refeed.popleft() if self._refeed else next(self._items)
            encoded, kept, sizes = [], [], []
            for i in item.indices:
                i = int(i)
                if i in self.skipped:
                    continue
                try:
                    data = self.index.read(i)
                    if self.train:
                        sizes.append(self._image_size(i, data))
                except DataError as e:
                    if not self.skip_bad_files:
                        raise
                    self._skip(i, str(e))
                    continue
                encoded.append(data)
                kept.append(i)
            self._pending.append(item._replace(indices=np.asarray(kept, dtype=np.int64)))
            if not encoded:
                continue
            if not self.train:
                return encoded
            t = self.transform
            width, height = np.asarray(sizes, dtype=np.int64).reshape(-1, 2).T
            aug = training_augmentation(self.seed, item.epoch, np.asarray(kept), width, height,
                                        t.scale, t.ratio, t.flip)
            anchors = [np.array(a, dtype=np.int32) for a in zip(aug.left, aug.top)]
            shapes = [np.array(a, dtype=np.int32) for a in zip(aug.width, aug.height)]
            mirrors = [np.array(f, dtype=np.int32) for f in aug.flip]
            return encoded, anchors, shapes, mirrors

    def _image_size(self, i: int, data: np.ndarray) -> tuple[int, int]:
        """(width, height) of sample ``i`` from its header; DataError naming the file when the
        header cannot be parsed."""
        try:
            return image_size(data)
        except Exception as e:  # noqa: BLE001 - Pillow's header parsers raise various errors
            raise DataError(f"{self.index.path(i)}: cannot decode sample {i} of "
                            f"{self.index.source} (its header: {type(e).__name__}: {e})") from e

    def _skip(self, i: int, reason: str) -> None:
        self.skipped[i] = reason
        log.warning("skipping sample %d (%d skipped so far): %s", i, len(self.skipped), reason)

    def _recover(self, error: RuntimeError) -> None:
        """DALI failed on one of the pending micro-batches: name the undecodable files (raise),
        or in skip mode drop them, rebuild and hand the pending micro-batches over again. A device
        failure raises DeviceError at once: the files are not at fault."""
        failure = device_failure(str(error))
        if failure is not None:
            raise DeviceError(self.device, f"DALI failed ({failure}) on a batch of "
                              f"{sum(len(item.indices) for item in self._pending)} samples: "
                              f"{_line_with(str(error), failure)}") from error
        suspects = [int(i) for item in self._pending for i in item.indices]
        bad = {}
        for i in suspects:
            reason = _pillow_decode_error(self.index.read(i))
            if reason is not None:
                bad[i] = f"{self.index.path(i)}: cannot decode sample {i} of {self.index.source} ({reason})"
        if not bad:
            names = ", ".join(self.index.path(i) for i in suspects[:4])
            raise DataError(
                f"DALI failed on a batch of {len(suspects)} files ({names}"
                f"{', ...' if len(suspects) > 4 else ''}) that Pillow decodes: {error}") from error
        if not self.skip_bad_files:
            first = next(iter(bad.values()))
            more = f" (and {len(bad) - 1} more undecodable files)" if len(bad) > 1 else ""
            raise DataError(first + more) from error
        for i, reason in bad.items():
            self._skip(i, reason)
        self._refeed.extend(self._pending)
        self._pending.clear()
        self._pipe = self._build()
        self._schedule()

    def _schedule(self) -> None:
        """Start the next iteration (the first call of an epoch starts ``prefetch_depth``)."""
        try:
            self._pipe.schedule_run()
        except DataError:
            raise
        except RuntimeError as e:
            self._recover(e)

    # -- torch side ---------------------------------------------------------------------------
    def _to_torch(self, images, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.from_numpy(self.index.labels[indices])
        dtype = TORCH_DTYPES[self.transform.dtype]
        nhwc = self.transform.channels_last
        if len(indices) == 0:
            size = self.transform.crop_size
            empty = torch.empty((0, size, size, 3) if nhwc else (0, 3, size, size), dtype=dtype,
                                device=self.device)
            return (empty.permute(0, 3, 1, 2) if nhwc else empty), labels.to(self.device)
        if self.device_id is not None:
            out, labels = _gpu_tensor(images, dtype, self.device_id), labels.to(self.device)
        else:
            # A view of DALI's buffer, which the next outputs() call recycles: copy (or convert).
            view = torch.from_numpy(np.asarray(images.as_tensor()))
            out = view.to(dtype) if view.dtype != dtype else view.clone()
        # NHWC memory seen as NCHW: torch's channels_last layout, no copy
        return (out.permute(0, 3, 1, 2) if nhwc else out), labels

    def _produce(self, items):
        if self._pipe is None:
            raise RuntimeError("this DaliLoader has been closed; make a new one")
        if not self._idle:  # the last epoch was abandoned half-way: drop what is in flight
            self._pending.clear()
            self._refeed.clear()
            self._pipe = self._build()
        self._idle = False
        self._items = items
        self._schedule()
        while True:
            if self._pending and len(self._pending[0].indices) == 0:
                item = self._pending.popleft()  # nothing to decode: no DALI output belongs to it
                yield item, self._to_torch(None, item.indices)
                continue
            try:
                (images,) = self._pipe.outputs()
            except StopIteration:
                break
            except DataError:
                raise
            except RuntimeError as e:
                self._recover(e)
                continue
            item = self._pending.popleft()
            batch = self._to_torch(images, item.indices)
            self._schedule()
            yield item, batch
        while self._pending:  # empty micro-batches queued after the last DALI run
            item = self._pending.popleft()
            yield item, self._to_torch(None, item.indices)
        self._pipe.reset()
        self._items = None
        self._idle = True


def _gpu_tensor(images, dtype: torch.dtype, device_id: int) -> torch.Tensor:
    """Copy a DALI GPU batch into a new CUDA tensor on the current stream (GPU mode only)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float16 if dtype == torch.float16 else torch.float32,
                      device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out.to(dtype)
