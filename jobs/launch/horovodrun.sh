#!/usr/bin/env bash
# Run an hvd-largebatch config with horovodrun on a fixed set of hosts, one rank per GPU.
#
#   NODES=4 GPUS_PER_NODE=8 HOSTS=node1:8,node2:8,node3:8,node4:8 \
#       CONFIG=jobs/configs/smith_30min_resnet50.yaml bash jobs/launch/horovodrun.sh
#   DRY_RUN=1 NODES=1 bash jobs/launch/horovodrun.sh      # print the check and the commands
#
# Hosts: HOSTS (`h1:8,h2:8`) or HOSTFILE (`host slots=8` lines); one node defaults to
# localhost. horovodrun reaches the other hosts over passwordless ssh; it has no SLURM or PBS
# integration (use slurm.sbatch or pbs.sh there). HOROVODRUN_ARGS: more horovodrun arguments,
# space separated (for example "--gloo" or "--network-interface ib0"). Other settings: see
# common.sh. Steps: check, pre-flight allreduce, train.
set -euo pipefail
JOBS_DIR="${JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$JOBS_DIR/launch/common.sh"
hl_settings

hl_host_args
read -r -a extra_args <<< "${HOROVODRUN_ARGS:-}"

hl_check horovodrun "${check_args[@]}"
hl_need "$HOROVODRUN" HOROVODRUN
launch=("$HOROVODRUN" -np "$NP" "${host_args[@]}" "${extra_args[@]}")
hl_preflight "${launch[@]}"
hl_step "${launch[@]}" "${TRAIN_CMD[@]}"
