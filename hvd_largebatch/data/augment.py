"""Per-sample training augmentation as a pure function of (seed, epoch, sample index).

Every random number an augmentation uses is a counter-based hash of ``(seed, epoch, index,
draw number)``: no generator state exists, so the crop window and flip of a sample do not depend
on the world size, the rank, the micro-batch it lands in, the loader's or DALI's seed, or on how
many batches were produced before (a run resumed after ``kill -9`` draws exactly what the
uninterrupted run drew). The windows are computed on the host from each image's size and handed
to the pipelines as per-sample inputs (DALI: ``decoders.image_slice`` + ``mirror``; the Pillow
baseline: the same box and flip).

The crop algorithm is torchvision's ``RandomResizedCrop``: up to ``ATTEMPTS`` tries of an area
fraction uniform in ``scale`` and an aspect ratio (w / h) log-uniform in ``ratio``; the first
window that fits is placed uniformly (integer pixel offsets); when none fits, the central crop
with the aspect ratio clamped to ``ratio``. Sizes and offsets are in pixels of the stored image
(EXIF orientation is not applied, by the pipelines either).

The hash is SplitMix64's finaliser applied to a linear combination of the four counters with
odd 64-bit constants, giving uniforms in [0, 1) with 53 random bits.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: tries of torchvision's RandomResizedCrop before the central-crop fallback
ATTEMPTS = 10
#: uniforms drawn per sample: 4 per attempt (area, log ratio, left, top) and one for the flip
DRAWS = 4 * ATTEMPTS + 1

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_K = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03),
      np.uint64(0xAEF17502108EF2D9), np.uint64(0xDB4F0B9175AE2165))


class Augmentation(NamedTuple):
    """Per-sample parameters (arrays of length n): crop window ``left, top, width, height`` in
    pixels (int32) and ``flip`` (uint8, 1 = mirror horizontally)."""

    left: np.ndarray
    top: np.ndarray
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: np.ndarray, draws: int) -> np.ndarray:
    """``[len(indices), draws]`` float64 uniforms in [0, 1), a pure function of (seed, epoch,
    sample index, draw number)."""
    idx = np.asarray(indices, dtype=np.uint64)[:, None]
    j = np.arange(draws, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * _K[0] + np.uint64(epoch) * _K[1]) + idx * _K[2] + j * _K[3]
        x = _mix(_mix(x) + _K[0])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def training_augmentation(seed: int, epoch: int, indices: np.ndarray, widths: np.ndarray,
                          heights: np.ndarray, scale: tuple[float, float],
                          ratio: tuple[float, float], flip: bool) -> Augmentation:
    """Crop windows and flips of samples ``indices`` in ``epoch`` (images of ``widths`` x
    ``heights`` pixels), as the module docstring says."""
    n = len(indices)
    u = uniforms(seed, epoch, indices, DRAWS)
    width = np.asarray(widths, dtype=np.float64)[:, None]
    height = np.asarray(heights, dtype=np.float64)[:, None]
    area = width * height
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    tries = u[:, :4 * ATTEMPTS].reshape(n, ATTEMPTS, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    aspect = np.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(n), first]
    pick = (np.arange(n), first)
    w, h = w[pick], h[pick]
    width, height = width[:, 0], height[:, 0]
    left = np.floor(tries[..., 2][pick] * (width - w + 1))
    top = np.floor(tries[..., 3][pick] * (height - h + 1))
    # fallback: the central crop, aspect ratio clamped to ``ratio``
    in_ratio = width / height
    fw = np.where(in_ratio > ratio[1], np.rint(height * ratio[1]), width)
    fh = np.where(in_ratio < ratio[0], np.rint(width / ratio[0]), height)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    left = np.where(found, left, (width - w) // 2)
    top = np.where(found, top, (height - h) // 2)
    flips = (u[:, -1] < 0.5) if flip else np.zeros(n, dtype=bool)
    as_int = (lambda a: a.astype(np.int32))
    return Augmentation(as_int(left), as_int(top), as_int(w), as_int(h), flips.astype(np.uint8))
