#!/usr/bin/env bash
# Run an hvd-largebatch config with Open MPI's mpirun, one rank per GPU, with Horovod's
# documented mpirun flags (MPIRUN_FLAGS in common.sh). Also used by pbs.sh and by the launcher
# pod of the Kubeflow MPIJob (mpijob.yaml).
#
#   NODES=32 GPUS_PER_NODE=8 HOSTFILE=hosts.txt DATA=/lustre/imagenet DATA_REMOTE=1 \
#       CONFIG=jobs/configs/goyal_1h_resnet50.yaml bash jobs/launch/mpirun.sh
#   DRY_RUN=1 bash jobs/launch/mpirun.sh        # print the check and the commands only
#
# Hosts: HOSTFILE (Open MPI hostfile, `host slots=8` lines) or HOSTS (`h1:8,h2:8`); with
# neither, one node runs on localhost and several nodes take the hosts of the allocation mpirun
# runs in (SLURM, PBS, LSF, or OMPI_MCA_orte_default_hostfile as the MPI Operator sets it).
# MPIRUN_ARGS: more mpirun arguments, space separated (for example
# "-mca btl_tcp_if_include ib0"). Other settings: see common.sh. Steps: check, pre-flight allreduce, train.
set -euo pipefail
JOBS_DIR="${JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$JOBS_DIR/launch/common.sh"
hl_settings

hl_host_args

read -r -a extra_args <<< "${MPIRUN_ARGS:-}"

hl_check mpirun "${check_args[@]}"
hl_need "$MPIRUN" MPIRUN
launch=("$MPIRUN" -np "$NP" "${host_args[@]}" "${MPIRUN_FLAGS[@]}" "${extra_args[@]}")
hl_preflight "${launch[@]}"
hl_step "${launch[@]}" "${TRAIN_CMD[@]}"
