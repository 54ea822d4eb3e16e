"""Shared driver of the multi-rank benchmarks: print the machine, run the benchmark script's
``--worker`` mode on Horovod ranks (1 torch thread each), relay the lines rank 0 prints with the
``BENCH `` prefix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_workers(script: str, worker_args: list[str], np: int, launcher: str) -> int:
    """Run ``python script --worker worker_args...`` on ``np`` local ranks; returns the exit code
    (the whole output is printed when it is not 0)."""
    sys.path.insert(0, str(HERE))
    from bench_lars import cpu_model, physical_cores

    sys.path.insert(0, str(HERE.parent / "tests"))
    from launch import ROOT_ENV, launcher_command

    print(f"machine: {cpu_model()}; {physical_cores()} physical cores, {os.cpu_count()} logical; "
          f"{np} Horovod ranks ({launcher}), 1 torch thread each", flush=True)
    cmd = [*launcher_command(launcher, np), sys.executable, str(Path(script).resolve()),
           "--worker", *worker_args]
    env = {**os.environ, **ROOT_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = "[0]<stdout>:" if launcher == "gloo" else ""
    for line in proc.stdout.splitlines():
        if line.startswith(prefix + "BENCH "):
            print(line[len(prefix + "BENCH "):], flush=True)
    if proc.returncode != 0:
        print(proc.stdout)
    return proc.returncode
