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
#: the per-rank scripts that the multi-process tests launch
MP = Path(__file__).resolve().parent / "mp"
BIN = Path(sys.executable).parent
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
#: ``python`` arguments that run the ``hvd-largebatch`` command line
CLI = ("-m", "hvd_largebatch.cli")


def launcher_command(launcher: str, np: int) -> list[str]:
    """The launcher prefix for ``np`` local ranks (``gloo`` = horovodrun --gloo, or ``mpirun``)."""
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    if launcher == "mpirun":
        return [*MPIRUN, "-np", str(np)]
    raise ValueError(f"unknown launcher {launcher!r}")


#: mpirun and its options for local test jobs (the environment is forwarded with -x)
MPIRUN = ["mpirun", "--oversubscribe", "-bind-to", "none", "-map-by", "slot",
          "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
          "-mca", "btl", "self,tcp", "-mca", "btl_tcp_if_include", "lo"]


def job_env(extra: dict | None = None) -> dict:
    """The environment of a launched job: root allowed for Open MPI, one thread, this repo first;
    then ``extra`` (a value of None removes the variable)."""
    env = {**os.environ, **ROOT_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(extra or {})}
    return {k: v for k, v in env.items() if v is not None}


def run_command(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command line to completion (output combined in ``.stdout``); kill its whole
    process group and raise ``AssertionError`` with the output when it outlives ``timeout``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(env), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"job {' '.join(map(str, cmd))} hung for {timeout}s:\n{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_ranks(script: str | Path, *args: str, np: int = 2, launcher: str = "gloo",
              timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args...`` on ``np`` ranks (``script`` may be ``"-m"``, followed by a
    module in ``args``); return the finished process (never hangs)."""
    cmd = [*launcher_command(launcher, np), sys.executable, str(script), *map(str, args)]
    return run_command(cmd, timeout, env)
