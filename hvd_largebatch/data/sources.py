"""Where the images are: an index of file paths and labels, built once and shared across epochs.

Two layouts are read:

* an ImageNet-style folder: one sub-folder per class, classes sorted by name (label = position),
  image files inside each class folder sorted by name;
* a file list: one ``path label`` line per sample (path relative to ``root``, which defaults to the
  list's folder; the label is the last whitespace-separated field, so paths may hold spaces;
  blank lines and lines starting with ``#`` are ignored).

The paths are held as one UTF-8 byte buffer plus an offsets array (two numpy arrays) rather than
one Python string per file: the 1.28M paths of ImageNet take ~60 MB, building the index creates no
long-lived per-file objects, and processes forked from the owner share the pages.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

from hvd_largebatch.errors import DataError

#: threads that stat the files of a list at indexing (network file systems answer in parallel)
STAT_THREADS = 32
#: files per stat task
STAT_CHUNK = 2048

#: File name endings (lower case) taken as images when scanning a folder: the formats DALI decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2",
                    ".ppm", ".pgm", ".pnm")


class FileIndex:
    """Relative paths, labels and class names of a data set (one entry per sample).

    ``labels`` is an int64 numpy array; ``path(i)`` is the file of sample ``i``; ``read(i)`` its
    encoded bytes. ``source`` names the folder or list the index came from (used in errors).
    """

    def __init__(self, root: str, rel_paths: Sequence[str], labels: np.ndarray,
                 classes: Sequence[str] | None, source: str):
        joined = "\n".join(rel_paths).encode("utf-8")
        blob = np.frombuffer(joined, dtype=np.uint8)
        newlines = np.flatnonzero(blob == ord("\n"))
        if len(newlines) != max(len(rel_paths) - 1, 0):
            bad = next(p for p in rel_paths if "\n" in p)
            raise DataError(f"{os.path.join(root, bad)!r}: file names with a newline are not supported")
        offsets = np.empty(len(rel_paths) + 1, dtype=np.int64)
        offsets[0] = 0
        offsets[1:-1] = newlines + 1
        offsets[-1] = len(blob) + 1  # as if a trailing newline followed the last path
        self.root = root
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes) if classes is not None else None
        self.source = source
        self._blob = blob
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes: class folders, the list's ``num_classes``, else ``max(label) + 1``."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def rel_path(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1] - 1
        return self._blob[start:end].tobytes().decode("utf-8")

    def path(self, i: int) -> str:
        """Full path of sample ``i``."""
        return os.path.join(self.root, self.rel_path(i))

    def paths(self, indices: Iterable[int]) -> list[str]:
        return [self.path(int(i)) for i in indices]

    def read(self, i: int) -> np.ndarray:
        """Encoded bytes of sample ``i`` as a uint8 array; DataError naming the file if it is
        missing, unreadable or empty."""
        path = self.path(i)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read sample {i} of {self.source} ({e.strerror or e})") from e
        if not data:
            raise DataError(f"{path}: sample {i} of {self.source} is an empty file")
        return np.frombuffer(data, dtype=np.uint8)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the relative paths, the labels and the class names: equal for two
        copies of one data set under different roots, different for any other set."""
        h = hashlib.sha256()
        h.update(self._blob.tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        h.update("\n".join(self.classes or ()).encode("utf-8"))
        return h.hexdigest()
    def subset(self, keep: np.ndarray) -> "FileIndex":
        """A new index of the samples ``keep`` (ascending sample indices), same root, classes
        and source; sample ``j`` of the result is sample ``keep[j]`` here."""
        keep = np.asarray(keep, dtype=np.int64)
        return FileIndex(self.root, [self.rel_path(int(i)) for i in keep], self.labels[keep],
                         self.classes, self.source)

    def check_labels(self, num_classes: int) -> None:
        """DataError naming the first file whose label is outside ``[0, num_classes)``."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{self.path(i)}: label {self.labels[i]} is outside [0, {num_classes}) "
                f"({bad.size} such samples in {self.source})")

    # -- builders ---------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> "FileIndex":
        """Index an ImageNet-style folder (``root/<class>/<image>``).

        DataError if ``root`` is missing, has no class folders, or a class folder holds no file
        with one of ``extensions`` (an empty class would silently shift no label but would make
        the class count disagree with the model).
        """
        root = os.fspath(root)
        exts = tuple(e.lower() for e in extensions)
        try:
            class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        except OSError as e:
            raise DataError(f"{root}: cannot list the data folder ({e.strerror or e})") from e
        if not class_names:
            raise DataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
        rel_paths: list[str] = []
        counts = np.empty(len(class_names), dtype=np.int64)
        for label, name in enumerate(class_names):
            folder = os.path.join(root, name)
            try:
                files = sorted(e.name for e in os.scandir(folder)
                               if e.name.lower().endswith(exts) and e.is_file())
            except OSError as e:
                raise DataError(f"{folder}: cannot list the class folder ({e.strerror or e})") from e
            if not files:
                raise DataError(f"{folder}: class folder '{name}' holds no image files "
                                f"({', '.join(exts)})")
            rel_paths.extend(f"{name}/{f}" for f in files)
            counts[label] = len(files)
        labels = np.repeat(np.arange(len(class_names), dtype=np.int64), counts)
        return cls(root, rel_paths, labels, class_names, source=root)

    @classmethod
    def from_file_list(cls, list_path: str, root: str | None = None,
                       num_classes: int | None = None, check_files: bool = True,
                       check_share: tuple[int, int] = (0, 1)) -> "FileIndex":
        """Index a ``path label`` list. DataError naming the list and line for a malformed line,
        a label outside ``[0, num_classes)`` (only ``>= 0`` is checked without num_classes) or,
        with ``check_files``, a listed file that is not there (stat'ed in parallel by
        ``STAT_THREADS`` threads). ``check_share=(k, n)``: stat only the samples ``i`` with
        ``i % n == k``, so that the ``n`` processes of one node share the work (the trainer
        passes the local rank and the ranks on the node: every node checks its own copy of
        the data once)."""
        list_path = os.fspath(list_path)
        root = os.path.dirname(os.path.abspath(list_path)) if root is None else os.fspath(root)
        try:
            with open(list_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"{list_path}: cannot read the file list ({e.strerror or e})") from e
        rel_paths: list[str] = []
        labels: list[int] = []
        linenos: list[int] = []
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                label = int(parts[1])
            except (IndexError, ValueError):
                raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise DataError(f"{list_path}:{lineno}: label {label} of {parts[0]!r} is not {limit}")
            rel_paths.append(parts[0])
            labels.append(label)
            linenos.append(lineno)
        if not rel_paths:
            raise DataError(f"{list_path}: the file list has no samples")
        if check_files:
            missing = first_missing(root, rel_paths, *check_share)
            if missing is not None:
                i, reason = missing
                raise DataError(f"{list_path}:{linenos[i]}: {os.path.join(root, rel_paths[i])}: "
                                f"listed file {reason}")
        classes = [str(c) for c in range(num_classes)] if num_classes is not None else None
        return cls(root, rel_paths, np.asarray(labels, dtype=np.int64), classes, source=list_path)


def first_missing(root: str, rel_paths: Sequence[str], share: int = 0,
                  shares: int = 1) -> tuple[int, str] | None:
    """``(index, reason)`` of the first of ``rel_paths[share::shares]`` (under ``root``) that is
    not a regular file, or None; stat'ed by ``STAT_THREADS`` threads, ``STAT_CHUNK`` per task."""
    mine = range(share, len(rel_paths), shares)

    def scan(start: int) -> int | None:
        for i in mine[start:start + STAT_CHUNK]:
            if not os.path.isfile(os.path.join(root, rel_paths[i])):
                return i
        return None

    with ThreadPoolExecutor(min(STAT_THREADS, 1 + len(mine) // STAT_CHUNK)) as pool:
        for i in pool.map(scan, range(0, len(mine), STAT_CHUNK)):
            if i is not None:
                there = os.path.lexists(os.path.join(root, rel_paths[i]))
                return i, "is not a regular file" if there else "not found"
    return None
