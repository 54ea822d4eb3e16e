"""``hvd-largebatch check-data PATH``: the image check of ``hvd_largebatch.data.check`` on a data
set, without training: every unusable file named, with the count and the time taken.

PATH is a training-data folder holding ``train/`` and ``val/`` (both are checked), one
ImageNet-style class folder (``PATH/<class>/<image>``), or a ``path label`` file list. The result
is cached as a training run would cache it, so a run over the same index starts without
re-checking. Exit status: 0 when every file is usable, 1 when some are not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="data folder (train/ + val/), class folder, or file list")
    parser.add_argument("--threads", type=int, default=None,
                        help="checking threads (default: the cores this process may use)")
    parser.add_argument("--cache-dir", default=None,
                        help="where results are cached (default $HVD_LARGEBATCH_CACHE/data-check, "
                             "~/.cache/hvd-largebatch/data-check)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write a cache")
    parser.add_argument("--force", action="store_true", help="check again, ignoring a cached result")


def indexes(path: str):
    """The indexes PATH stands for (see the module docstring)."""
    from hvd_largebatch.data import FileIndex

    if os.path.isfile(path):
        return [FileIndex.from_file_list(path)]
    splits = [os.path.join(path, s) for s in ("train", "val")]
    if all(os.path.isdir(s) for s in splits):
        return [FileIndex.from_folder(s) for s in splits]
    return [FileIndex.from_folder(path)]


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.data.check import check_index, default_cache_dir
    from hvd_largebatch.errors import DataError

    if args.threads is not None and args.threads < 1:
        print(f"hvd-largebatch check-data: error: --threads: must be >= 1, got {args.threads}",
              file=sys.stderr)
        return 2
    try:
        found = indexes(args.path)
    except DataError as e:
        print(f"hvd-largebatch check-data: error: {e}", file=sys.stderr)
        return 2
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    unusable = 0
    for index in found:
        result = check_index(index, threads=args.threads, cache_dir=cache, force=args.force)
        unusable += len(result.bad)
        for i in sorted(result.bad):
            print(result.bad[i])
        how = (f"from the cache {result.cache}" if result.seconds == 0 and result.cache else
               f"in {result.seconds:.1f} s ({result.files / max(result.seconds, 1e-9):,.0f} files/s)")
        print(f"{index.source}: {result.files} files, {len(result.bad)} unusable; checked {how}")
    return 1 if unusable else 0
