"""The image check run before a data set's first use: every file is read and decoded once on the
host, so that no rank ever hands a corrupt file to DALI.

Why: DALI's decoders may crash the process (SIGSEGV) on some corrupt inputs before the loader
can attribute the failure to a file (issue 15: 300 random bytes in a PNG, per-rank batches of 32
and more). A check before the sampler is built turns every bad file into either one
``DataError`` naming it, or, with ``data.skip_bad_files``, an index without it (so every global
batch stays full and every readable sample is still read exactly once per epoch).

What a file must pass (:func:`check_bytes`), in this order, each step cheaper than the next:

1. it can be read and is not empty;
2. its first bytes are the signature of a format DALI decodes (JPEG, PNG, BMP, TIFF, WebP,
   JPEG 2000, PNM), whatever its name says: a text file or a GIF named ``.jpg`` fails here, a
   PNG named ``.jpg`` passes (DALI decodes by content);
3. Pillow parses its header, width and height are >= 1;
4. Pillow decodes it completely. JPEGs are decoded with Pillow's ``draft`` (libjpeg's DCT
   scaling to ~1/8 of the size): every entropy-coded segment is still read and Huffman-decoded,
   so truncation and corrupt scan data are found, at a fraction of a full decode's cost. A file
   whose format this Pillow cannot decode (JPEG 2000 without OpenJPEG) stops after step 3.

The check runs in a thread pool (file reads and Pillow's decoders release the GIL; threads are
safe in an MPI process, where ``fork`` is not); a training run splits the files over its ranks
(``check_part`` on every rank, ``hvd_largebatch.training.data_check``). Its result is cached as JSON under
``<cache_dir>/<fingerprint>.json``, the fingerprint being a SHA-256 of the index (root, relative
paths, labels): a second run over the same index reads the cache instead of the files. A file
replaced in place after its check is not re-checked; delete the cache file (or run
``hvd-largebatch check-data --force``) after editing a data set in place.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hvd_largebatch.data.sources import FileIndex

#: file signatures (offset, bytes) of the formats DALI decodes
SIGNATURES = (
    ("JPEG", 0, b"\xff\xd8\xff"), ("PNG", 0, b"\x89PNG\r\n\x1a\n"), ("BMP", 0, b"BM"),
    ("TIFF", 0, b"II*\x00"), ("TIFF", 0, b"MM\x00*"), ("WEBP", 8, b"WEBP"),
    ("JPEG2000", 0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"), ("JPEG2000", 0, b"\xffO\xffQ"),
    *(("PNM", 0, b"P%d" % k) for k in range(1, 7)),
)
#: files per task handed to a checking thread
CHUNK = 256
#: bumped when the check changes, so that old cache files are not trusted
VERSION = 1


def default_cache_dir() -> str:
    """``$HVD_LARGEBATCH_CACHE/data-check`` (default ``~/.cache/hvd-largebatch/data-check``)."""
    base = os.environ.get("HVD_LARGEBATCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hvd-largebatch")
    return os.path.join(base, "data-check")


def image_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with, or None."""
    for name, offset, magic in SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def check_bytes(data: bytes) -> str | None:
    """Why ``data`` (a whole encoded file) is not a usable image, or None when it is."""
    from PIL import Image

    if not data:
        return "empty file"
    kind = image_format(data)
    if kind is None:
        return f"not an image DALI decodes (starts with {data[:8]!r})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1:
                return f"{kind} of {width}x{height} pixels"
            if kind == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            try:
                image.load()
            except OSError as e:
                if "decoder" in str(e) and "not available" in str(e):
                    return None  # this Pillow cannot decode the format: the header was read
                raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the answer
        return f"{kind}: {type(e).__name__}: {e}"
    return None


def image_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) in pixels from an encoded image's header (EXIF orientation ignored).
    Raises Pillow's error when the header cannot be parsed (the loader names the file)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def check_file(path: str) -> str | None:
    """Why the file at ``path`` is not a usable image, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    return check_bytes(data)


def fingerprint(index: FileIndex) -> str:
    """SHA-256 (hex) of the index: its root, relative paths and labels."""
    h = hashlib.sha256(f"v{VERSION}\0{os.path.abspath(index.root)}\0".encode())
    h.update(index._blob.tobytes())
    h.update(index.labels.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CheckResult:
    """``bad``: sample index -> ``"<path>: <reason>"``, for every unusable file; ``files``:
    files in the index; ``seconds``: wall time of the check (0 when read from the cache);
    ``cache``: the cache file used or written (None without a cache)."""

    bad: dict[int, str]
    files: int
    seconds: float
    cache: str | None

    def first_error(self, source: str) -> str:
        """One line naming the first bad file and how many there are."""
        i = min(self.bad)
        more = f" ({len(self.bad) - 1} more unusable files)" if len(self.bad) > 1 else ""
        return f"{self.bad[i]}: sample {i} of {source}{more}; data.skip_bad_files: true skips them"


def cache_path(index: FileIndex, cache_dir: str) -> str:
    """The cache file of ``index``'s check result under ``cache_dir``."""
    return os.path.join(cache_dir, fingerprint(index) + ".json")


def cached_result(index: FileIndex, cache_dir: str | None) -> CheckResult | None:
    """The cached check result of ``index``, or None (no cache, none written yet, or written by
    another check version)."""
    path = cache_path(index, cache_dir) if cache_dir else None
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("version") != VERSION or saved.get("files") != len(index):
        return None
    return CheckResult({int(i): r for i, r in saved["bad"].items()}, len(index), 0.0, path)


def check_part(index: FileIndex, indices: range, threads: int) -> dict[int, str]:
    """Check the files ``indices`` of ``index`` with ``threads`` threads: sample index ->
    ``"<path>: <reason>"`` for the unusable ones."""
    def chunk(lo: int) -> dict[int, str]:
        found = {}
        for i in indices[lo:lo + CHUNK]:
            reason = check_file(index.path(i))
            if reason is not None:
                found[i] = f"{index.path(i)}: {reason}"
        return found

    bad: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for found in pool.map(chunk, range(0, len(indices), CHUNK)):
            bad.update(found)
    return bad


def save_result(index: FileIndex, bad: dict[int, str], seconds: float,
                cache_dir: str | None) -> CheckResult:
    """The check result of ``index``, written to the cache (atomically) when ``cache_dir``."""
    path = cache_path(index, cache_dir) if cache_dir else None
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": VERSION, "source": index.source, "files": len(index),
                       "bad": {str(i): r for i, r in sorted(bad.items())}}, f, indent=1)
        os.replace(tmp, path)
    return CheckResult(dict(sorted(bad.items())), len(index), seconds, path)


def check_index(index: FileIndex, *, threads: int | None = None, cache_dir: str | None = None,
                force: bool = False) -> CheckResult:
    """Check every file of ``index`` in this process (see the module docstring), or read the
    cached result. ``threads``: checking threads (default: the cores this process may use);
    ``cache_dir``: where results are cached (None: no cache); ``force``: ignore a cached
    result."""
    cached = None if force else cached_result(index, cache_dir)
    if cached is not None:
        return cached
    start = time.perf_counter()
    bad = check_part(index, range(len(index)), threads or len(os.sched_getaffinity(0)))
    return save_result(index, bad, time.perf_counter() - start, cache_dir)


def readable(index: FileIndex, result: CheckResult) -> FileIndex:
    """``index`` without the files ``result`` found unusable (the same index when none)."""
    if not result.bad:
        return index
    keep = np.setdiff1d(np.arange(len(index)), np.fromiter(result.bad, dtype=np.int64))
    return index.subset(keep)
