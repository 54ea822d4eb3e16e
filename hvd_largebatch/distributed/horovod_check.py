"""Check that the installed Horovod has what this package needs: PyTorch, Gloo and MPI.

``python -m hvd_largebatch.distributed.horovod_check`` runs ``horovodrun --check-build``, reads its
checkboxes and exits non-zero with a message naming what is missing and how to rebuild.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

REBUILD_HINT = (
    "rebuild Horovod with HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 "
    "(`make install` does; remove ~/.cache/hvd-largebatch/wheels to force a rebuild)"
)


class HorovodBuildError(RuntimeError):
    """Horovod is missing or lacks a required framework, controller or operation backend."""


def parse_check_build(text: str) -> dict[str, dict[str, bool]]:
    """Parse ``horovodrun --check-build`` output into {section: {name: enabled}}."""
    sections: dict[str, dict[str, bool]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"\s*Available (.+):\s*$", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        box = re.match(r"\s*\[([ Xx])\]\s+(\S.*?)\s*$", line)
        if box and current is not None:
            current[box.group(2)] = box.group(1).lower() == "x"
    return sections


def horovodrun_path() -> str:
    """The horovodrun next to this interpreter (the venv's), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = local if os.path.exists(local) else shutil.which("horovodrun")
    if not found:
        raise HorovodBuildError(f"horovodrun not found next to {sys.executable} or on PATH; "
                                f"install Horovod 0.28.1: {REBUILD_HINT}")
    return found


def check_horovod_build() -> dict[str, dict[str, bool]]:
    """Return the parsed build report; raise HorovodBuildError naming anything missing."""
    proc = subprocess.run([horovodrun_path(), "--check-build"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise HorovodBuildError(f"`horovodrun --check-build` failed (exit {proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    report = parse_check_build(proc.stdout)
    missing = []
    if not report.get("Frameworks", {}).get("PyTorch"):
        missing.append("PyTorch framework")
    for name in ("Gloo", "MPI"):
        if not report.get("Controllers", {}).get(name):
            missing.append(f"{name} controller")
        if not report.get("Tensor Operations", {}).get(name):
            missing.append(f"{name} tensor operations")
    if missing:
        raise HorovodBuildError(f"Horovod was built without: {', '.join(missing)}; {REBUILD_HINT}")
    return report


def main() -> int:
    try:
        report = check_horovod_build()
    except HorovodBuildError as exc:
        print(f"[horovod check] ERROR: {exc}", file=sys.stderr)
        return 1
    enabled = {sec: [k for k, v in items.items() if v] for sec, items in report.items()}
    print(f"[horovod check] ok: {enabled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
