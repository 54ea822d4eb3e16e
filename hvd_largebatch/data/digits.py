"""scikit-learn's ``digits`` written out as an ImageNet-style folder: real data with no download.

``load_digits()`` holds 1,797 grey 8x8 images (pixel values 0..16) of the digits 0-9. They are
scaled to 0..255 (``round(v * 255 / 16)``) and upscaled to ``size`` x ``size`` pixels (32 by
default) with Pillow's bilinear filter: 8x8 is too small for the crop-and-resize augmentation and
for a ResNet stem, and bilinear upscaling adds no detail but keeps strokes smooth instead of
blocky. Images are stored as 8-bit grey PNG (lossless) or JPEG (quality 95); the pipelines decode
them to RGB.

Layout (``root``)::

    train/<digit>/<sample>.png   val/<digit>/<sample>.png   train.txt   val.txt   digits.json

``train.txt`` / ``val.txt`` are the same splits as ``path label`` file lists (paths relative to
``root``, in the order ``FileIndex.from_folder`` gives: by class, then by name). The split is
stratified and deterministic: per class, a permutation seeded by ``seed`` sends
``round(val_fraction * class size)`` samples to ``val``. ``<sample>`` is the row of the sample in
``load_digits()``. ``digits.json`` records the parameters; writing again with the same parameters
is a no-op.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from hvd_largebatch.errors import ConfigError, DataError

FORMATS = {"png": ("png", {}), "jpeg": ("jpg", {"quality": 95})}
MARKER = "digits.json"


def write_digits_folder(root: str, *, size: int = 32, image_format: str = "png",
                        val_fraction: float = 0.2, seed: int = 0,
                        overwrite: bool = False) -> dict:
    """Write the digits set under ``root``; return the summary also stored in ``digits.json``
    (parameters plus ``train`` / ``val`` sample counts).

    DataError if ``root`` holds other files, or a digits set written with other parameters and
    ``overwrite`` is False.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if size < 8:
        raise ConfigError("data.size", f"must be >= 8 (the source images are 8x8), got {size}")
    if image_format not in FORMATS:
        raise ConfigError("data.format", f"must be one of {', '.join(FORMATS)}, got {image_format!r}")
    if not 0 < val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {val_fraction}")
    params = {"size": size, "format": image_format, "val_fraction": val_fraction, "seed": seed}
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            existing = json.load(f)
        if existing["params"] == params:
            return existing
        if not overwrite:
            raise DataError(f"{root}: holds a digits set written with {existing['params']}, "
                            f"not {params}; pass overwrite=True to replace it")
        for name in ("train", "val", "train.txt", "val.txt", MARKER):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root}: folder is not empty and holds no {MARKER}; refusing to write into it")

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(targets), dtype=bool)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(targets == label))
        is_val[members[:int(round(val_fraction * len(members)))]] = True

    ext, save_args = FORMATS[image_format]
    lists = {"train": [], "val": []}
    for row, (image, label) in enumerate(zip(pixels, targets)):
        split = "val" if is_val[row] else "train"
        rel = f"{split}/{label}/{row:04d}.{ext}"
        os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
        big = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        big.save(os.path.join(root, rel), **save_args)
        lists[split].append((label, rel))
    for split, entries in lists.items():  # in the order FileIndex.from_folder lists them
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.writelines(f"{rel} {label}\n" for label, rel in sorted(entries))
    summary = {"params": params, "train": len(lists["train"]), "val": len(lists["val"])}
    with open(marker, "w") as f:
        json.dump(summary, f, indent=1)
    return summary
