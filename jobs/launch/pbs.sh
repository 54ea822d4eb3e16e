#!/usr/bin/env bash
#PBS -N hvd-largebatch
#PBS -l select=32:ncpus=64:ngpus=8:mpiprocs=8
#PBS -l walltime=02:00:00
#PBS -j oe
#
# PBS Pro / OpenPBS batch script: 8 MPI ranks per node (mpiprocs = GPUs), started by mpirun.sh
# with the job's node file as its hostfile.
#
#   qsub -V -l select=32:ncpus=64:ngpus=8:mpiprocs=8 jobs/launch/pbs.sh    # from the repo root,
#       with CONFIG, DATA, OUTPUT ... exported (-V passes the environment on)
#   DRY_RUN=1 NODES=32 bash jobs/launch/pbs.sh        # print the check and the mpirun lines
#
# Inside the job NODES is the number of distinct hosts in $PBS_NODEFILE and GPUS_PER_NODE
# defaults to 8 (keep it equal to mpiprocs); outside it (DRY_RUN) both come from the
# environment and mpirun would take the hosts from the allocation. qsub runs a copy of this
# file, so JOBS_DIR is $PBS_O_WORKDIR/jobs unless set. Other settings: see common.sh and
# mpirun.sh.
set -euo pipefail
if [[ -n "${PBS_O_WORKDIR:-}" ]]; then
    cd "$PBS_O_WORKDIR"
    JOBS_DIR="${JOBS_DIR:-$PBS_O_WORKDIR/jobs}"
else
    JOBS_DIR="${JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
fi
export JOBS_DIR
if [[ -n "${PBS_NODEFILE:-}" ]]; then
    NODES="$(sort -u "$PBS_NODEFILE" | wc -l)"
    export NODES HOSTFILE="$PBS_NODEFILE"
elif [[ "${DRY_RUN:-0}" != 1 ]]; then
    echo "pbs.sh: error: not inside a PBS job: submit with qsub (or set DRY_RUN=1 to print the commands)" >&2
    exit 2
fi
exec bash "$JOBS_DIR/launch/mpirun.sh"
