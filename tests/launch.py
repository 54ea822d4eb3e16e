"""Launch real Horovod ranks from tests: ``horovodrun --gloo`` or ``mpirun``, with a hard timeout.

Every multi-process test goes through :func:`run_ranks` so that a rank that dies or hangs fails
the test within ``timeout`` seconds instead of hanging the suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launcher_command(launcher: str, np: int) -> list[str]:
    """The launcher prefix for ``np`` local ranks (``gloo`` = horovodrun --gloo, or ``mpirun``)."""
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(np), "--oversubscribe", "-bind-to", "none", "-map-by", "slot",
                "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
                "-mca", "btl", "self,tcp", "-mca", "btl_tcp_if_include", "lo"]
    raise ValueError(f"unknown launcher {launcher!r}")


def run_ranks(script: str | Path, *args: str, np: int = 2, launcher: str = "gloo",
              timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args...`` on ``np`` ranks; return the finished process (never hangs).

    Raises ``AssertionError`` with the collected output when the job outlives ``timeout``.
    """
    full_env = {**os.environ, **ROOT_ENV, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    cmd = [*launcher_command(launcher, np), sys.executable, str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"{launcher} job {' '.join(cmd)} hung for {timeout}s:\n{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
