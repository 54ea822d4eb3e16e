"""DALI pipeline definitions: encoded image bytes in, normalized NCHW (or NHWC, with
``ImageTransform.channels_last``) batches out, in the transform's dtype.

The encoded bytes come from an ``external_source`` callback in batch mode, so every iteration may
carry a different number of samples, up to the ``batch_size`` the pipeline is built for (the
largest per-rank micro-batch of the schedule): a batch-size change needs no rebuild.

Training: the crop window (pixels) and the horizontal flip of every sample are drawn on the host
(``hvd_largebatch.data.augment``) and come in through the same ``external_source`` as per-sample
inputs: ``decoders.image_slice`` decodes the window (anchor and shape as its positional inputs,
so a JPEG decoder may skip what lies outside it), ``resize`` scales it to the crop size and
``crop_mirror_normalize`` mirrors it when its per-sample ``mirror`` input says so. No operator
draws random numbers. EXIF orientation is not applied (``adjust_orientation=False``, in
validation too), as Pillow's ``Image.open`` does not, so the host-side image sizes are those the
decoder sees.

``device_id=None`` builds a CPU-only pipeline (libjpeg-turbo decoding, CPU resize); an integer
builds the GPU variant, which differs only in the decoder running as ``mixed`` (nvJPEG through
nvImageCodec), after which DALI places the remaining operators on that GPU.

GPU and CPU decoding do not give the same pixels. nvJPEG upsamples the chroma planes of 4:2:0 /
4:2:2 JPEGs differently from libjpeg-turbo unless ``jpeg_fancy_upsampling`` is set (it is, on the
mixed decoder, to bring the two together), its IDCT rounds differently, and on GPUs with a
hardware JPEG engine (A100, H100, H200) a share of every batch (DALI's ``hw_decoder_load``, 0.65
by default) goes to that engine, whose output may differ again. How close GPU and CPU pixels come
has not been measured by this package's tests (they run the CPU pipeline); bitwise agreement is
not claimed.

``build=False`` returns the pipeline with its graph defined but not built: on a machine without
CUDA the GPU variant gets this far (``build()`` is the first step that needs a device), which
lets the CPU tests check the GPU graph.
"""
from __future__ import annotations

from typing import Callable

from hvd_largebatch.data.transforms import ImageTransform

try:
    from nvidia.dali import Pipeline, fn, types
except ImportError as e:  # DALI is the optional "dali" extra
    raise ImportError(
        "the DALI input pipelines need NVIDIA DALI: pip install 'hvd-largebatch[dali]' "
        f"(nvidia-dali-cuda130); import failed with: {e}") from e


def build_pipeline(source: Callable[[], list], transform: ImageTransform, *, train: bool,
                   batch_size: int, device_id: int | None, num_threads: int, seed: int,
                   prefetch_depth: int = 2, build: bool = True) -> Pipeline:
    """Define, build (unless ``build=False``) and return the training or validation pipeline.

    Args:
        source: called once per iteration; raising StopIteration ends the epoch. Validation:
            returns a list of uint8 arrays (encoded files), at most ``batch_size`` of them.
            Training: returns four such lists, the encoded files, the crop windows' (left, top)
            and (width, height) in pixels (int32 pairs) and the horizontal flips (int32 0 / 1
            scalars), all drawn on the host (``hvd_largebatch.data.augment``).
        batch_size: the largest per-rank batch the pipeline will be fed.
        seed: DALI's seed (no operator of these pipelines draws random numbers: the
            augmentation comes in through ``source``).
        prefetch_depth: iterations DALI runs ahead of the consumer.
        build: False returns the defined graph without building it (no device needed).
    """
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=prefetch_depth)
    # the mixed decoder upsamples chroma as libjpeg-turbo does (see the module docstring)
    decoder = {"device": "cpu"} if device_id is None else {"device": "mixed",
                                                           "jpeg_fancy_upsampling": True}
    size = transform.crop_size
    with pipe:
        if train:
            # per-sample crop window (x, y) / (w, h) in pixels and flip, drawn on the host
            encoded, anchor, shape, mirror = fn.external_source(
                source=source, num_outputs=4, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32], ndim=[1, 1, 1, 0])
            images = fn.decoders.image_slice(encoded, anchor, shape, **decoder,
                                             output_type=types.RGB, axis_names="WH",
                                             adjust_orientation=False)
            images = fn.resize(images, resize_x=size, resize_y=size,
                               antialias=transform.train_antialias)
            crop = {}
        else:
            encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1,
                                         name="encoded")
            images = fn.decoders.image(encoded, **decoder, output_type=types.RGB,
                                       adjust_orientation=False)
            images = fn.resize(images, resize_shorter=transform.resize_shorter, antialias=True)
            mirror = 0
            crop = {"crop": (size, size), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, output_layout="HWC" if transform.channels_last else "CHW",
            mean=[255.0 * m for m in transform.mean], std=[255.0 * s for s in transform.std],
            dtype=types.FLOAT16 if transform.dtype == "float16" else types.FLOAT, **crop)
        pipe.set_outputs(images)
    if build:
        pipe.build()
    return pipe
