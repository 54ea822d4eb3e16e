"""The run's image check (``data.check_files``): which files of the training and validation sets
are unusable, decided by all ranks together before any rank builds a sampler or a pipeline.

``agreed_run`` calls :func:`agreed_check` (collective). Rank 0 looks for a cached result (keyed
by the index's fingerprint) and tells every rank; without one, rank r checks files r, r + W,
r + 2W, ... of each set (W ranks, each with its share of the node's cores as threads), the
unusable ones are gathered on every rank and rank 0 writes the cache. Every local step runs
under ``agree``, so a failure on any rank ends every rank with the same message.

Then ``setup_run`` drops the unusable files from the indexes (:func:`drop_unusable`). Without
``data.skip_bad_files`` an unusable file is a ``DataError`` naming it (and counting the others)
before any decoding; with it, rank 0 logs every unusable file by name with the count, and the
sampler is built over the readable files only, so every global batch keeps the schedule's size
and every readable sample is read exactly once per epoch. The schedule's ``dataset_size`` (when
not stated in the config) is the readable count.
"""
from __future__ import annotations

import logging
import os
import time

from hvd_largebatch.data import FileIndex
from hvd_largebatch.data.check import (CheckResult, cached_result, check_part, default_cache_dir,
                                       readable, save_result)
from hvd_largebatch.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def agreed_check(cfg, hvd, agree, index_data) -> dict[str, CheckResult] | None:
    """The check results of the run's training and validation sets, the same on every rank
    (collective; ``agree`` and ``index_data`` are setup.py's). None for synthetic data or
    ``data.check_files: false``."""
    d = cfg.data
    if d.source == "synthetic" or not d.check_files:
        return None
    rank, size, cache = hvd.rank(), hvd.size(), default_cache_dir()
    data = agree(hvd, lambda: index_data(cfg, None), "indexing data")
    indexes = {"train": data.train, "val": data.val}
    results = agree(hvd, lambda: {s: cached_result(i, cache) for s, i in indexes.items()}
                    if rank == 0 else None, "reading the data check cache")
    if size > 1:  # a fixed name: Horovod names it by type otherwise (None != dict)
        results = hvd.broadcast_object(results, root_rank=0, name="data.check.cached")
    threads = max(1, len(os.sched_getaffinity(0)) // hvd.local_size())
    for split, index in indexes.items():
        if results[split] is not None:
            continue
        start = time.perf_counter()
        mine = agree(hvd, lambda: check_part(index, range(rank, len(index), size), threads),
                     f"checking the {split} images")
        parts = hvd.allgather_object(mine, name=f"data.check.{split}") if size > 1 else [mine]
        bad = {i: reason for part in parts for i, reason in part.items()}
        seconds = time.perf_counter() - start
        results[split] = agree(hvd, lambda: save_result(index, bad, seconds, cache if rank == 0
                                                         else None), "writing the data check")
    agree(hvd, lambda: report(results, indexes, d.skip_bad_files, rank), "checking data")
    return results


def report(results: dict[str, CheckResult], indexes: dict[str, FileIndex], skip: bool,
           rank: int) -> None:
    """DataError naming the first unusable file unless ``skip``; else rank 0 logs them all."""
    for split in SPLITS:
        result, index = results[split], indexes[split]
        if result.bad and not skip:
            raise DataError(result.first_error(index.source))
        if result.bad and rank == 0:
            log.warning("data.skip_bad_files: skipping %d unusable of %d files of %s:\n  %s",
                        len(result.bad), result.files, index.source,
                        "\n  ".join(result.bad[i] for i in sorted(result.bad)))


def drop_unusable(index: FileIndex, result: CheckResult | None) -> FileIndex:
    """``index`` without the files ``result`` found unusable (``index`` itself without a
    result); DataError when none is left."""
    if result is None:
        return index
    if len(result.bad) == len(index):
        raise DataError(f"{index.source}: none of its {len(index)} files is a usable image")
    return readable(index, result)
