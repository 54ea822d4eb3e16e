"""Unpack Horovod's source release and apply the C++17 fix, for scripts/install.sh and
scripts/check_gpu.py alike.

Horovod 0.28.1 asks CMake for C++14; PyTorch >= 2.1 headers need C++17 (horovod #3998, fixed only
on Horovod's master). The fix raises ``CMAKE_CXX_STANDARD`` in the two CMakeLists that set it.

Usage: ``python3 scripts/horovod_source.py ARCHIVE DEST`` unpacks ``ARCHIVE``
(``horovod-<version>.tar.gz``) under ``DEST``, patches it and prints the source folder; a failure
prints one line and exits 1.
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

CMAKE_FILES = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")
OLD, NEW = "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)"


class SourceError(RuntimeError):
    """The archive is unreadable or the fix does not apply."""


def patch_cxx17(src: Path) -> None:
    """Raise the C++ standard of Horovod's CMake build from 14 to 17, in place (idempotent)."""
    for name in CMAKE_FILES:
        path = src / name
        try:
            text = path.read_text()
        except OSError as e:
            raise SourceError(f"{path}: cannot read it ({e.strerror}); not a Horovod source tree?")
        if OLD not in text and NEW not in text:
            raise SourceError(f"{path}: no '{OLD}' line; the C++17 fix does not apply to this "
                              "Horovod version")
        path.write_text(text.replace(OLD, NEW))


def unpack(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` under ``dest``, apply the C++17 fix, return the source folder."""
    try:
        with tarfile.open(archive) as tar:
            tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
            if len(tops) != 1:
                raise SourceError(f"{archive}: expected one top folder, found {sorted(tops)[:4]}")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+
            tar.extractall(dest, **safe)
    except (OSError, tarfile.TarError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise SourceError(f"{archive}: cannot unpack it ({type(e).__name__}: {first}); delete it "
                          "and fetch it again")
    src = dest / tops.pop()
    patch_cxx17(src)
    return src


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: horovod_source.py ARCHIVE DEST", file=sys.stderr)
        return 2
    try:
        print(unpack(Path(args[0]), Path(args[1])))
    except SourceError as e:
        print(f"horovod source: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
