"""The run's image check (``data.check_files``): which files of the training and validation sets
are unusable, decided once on rank 0 before any rank builds a sampler or a pipeline.

``agreed_run`` calls :func:`check_run_data` on rank 0 (inside ``agree``, so a failure ends every
rank with the same message) and broadcasts the result; ``setup_run`` then drops the unusable
files from the indexes (:func:`drop_unusable`). Without ``data.skip_bad_files`` an unusable file
is a ``DataError`` naming it (and counting the others) before any decoding; with it, every
unusable file is logged by name with the count, and the sampler is built over the readable files
only, so every global batch keeps the schedule's size and every readable sample is read exactly
once per epoch. The schedule's ``dataset_size`` (when not stated in the config) is the readable
count.
"""
from __future__ import annotations

import logging
import os

from hvd_largebatch.data import FileIndex
from hvd_largebatch.data.check import CheckResult, check_index, default_cache_dir, readable
from hvd_largebatch.errors import DataError

log = logging.getLogger(__name__)


def check_run_data(cfg, index_data) -> dict[str, CheckResult] | None:
    """Check the files of ``index_data(cfg)`` (a ``DataSets``); None for synthetic data or
    ``data.check_files: false``. DataError naming the first unusable file unless
    ``data.skip_bad_files``."""
    d = cfg.data
    if d.source == "synthetic" or not d.check_files:
        return None
    data = index_data(cfg, None)
    results = {}
    for split, index in (("train", data.train), ("val", data.val)):
        result = check_index(index, threads=len(os.sched_getaffinity(0)),
                             cache_dir=default_cache_dir())
        results[split] = result
        if result.bad and not d.skip_bad_files:
            raise DataError(result.first_error(index.source))
        if result.bad:
            log.warning("data.skip_bad_files: skipping %d unusable of %d files of %s:\n  %s",
                        len(result.bad), result.files, index.source,
                        "\n  ".join(result.bad[i] for i in sorted(result.bad)))
    return results


def drop_unusable(index: FileIndex, result: CheckResult | None) -> FileIndex:
    """``index`` without the files ``result`` found unusable (``index`` itself without a
    result); DataError when none is left."""
    if result is None:
        return index
    if len(result.bad) == len(index):
        raise DataError(f"{index.source}: none of its {len(index)} files is a usable image")
    return readable(index, result)
