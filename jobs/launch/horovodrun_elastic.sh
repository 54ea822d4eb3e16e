#!/usr/bin/env bash
# Elastic Horovod: horovodrun --min-np/--max-np with a host-discovery script, so that the job
# survives the loss of hosts and grows when hosts are added.
#
#   ELASTIC_HOSTS_FILE=/shared/hosts.txt NODES=32 MIN_NODES=16 MAX_NODES=32 \
#       CONFIG=jobs/configs/goyal_1h_resnet50.yaml bash jobs/launch/horovodrun_elastic.sh
#
# The trainer runs elastic with `train --elastic` (hvd_largebatch/training/elastic.py): the loop
# runs inside hvd.elastic.run, its model, optimizer, schedule position and sampler position are
# committed in memory at every checkpoint (train.checkpoint_every updates and each epoch end), and
# after a host change every rank rebuilds its sampler, loaders, micro-batch plan and optimizer
# wrapper for the new world size. When a host fails, the surviving ranks roll back to the last
# commit and continue. Gloo is the controller; sharded optimizer state is refused (a lost host
# takes its shard with it).
#
# World sizes: every phase's global batch must split over the ranks, so every world size
# between MIN_NODES and MAX_NODES nodes (x GPUS_PER_NODE) must divide every global batch; the
# check lists the ones that do not. The defaults (MIN_NODES = MAX_NODES = NODES) keep the world
# size fixed: a failed host is replaced by a spare from the discovery script.
#
# Settings: NODES (ranks at the start / GPUS_PER_NODE), MIN_NODES, MAX_NODES (default NODES),
# DISCOVERY_SCRIPT (default jobs/launch/discover_hosts.sh, which reads ELASTIC_HOSTS_FILE or the
# SLURM allocation), ELASTIC_TIMEOUT (seconds to wait for enough hosts, default 600),
# HOROVODRUN_ARGS; others: see common.sh.
set -euo pipefail
JOBS_DIR="${JOBS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$JOBS_DIR/launch/common.sh"
hl_settings

MIN_NODES="${MIN_NODES:-$NODES}"
MAX_NODES="${MAX_NODES:-$NODES}"
DISCOVERY_SCRIPT="${DISCOVERY_SCRIPT:-$JOBS_DIR/launch/discover_hosts.sh}"
ELASTIC_TIMEOUT="${ELASTIC_TIMEOUT:-600}"
for name in MIN_NODES MAX_NODES ELASTIC_TIMEOUT; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || hl_die "$name must be a positive integer, got '${!name}'"
done
read -r -a extra_args <<< "${HOROVODRUN_ARGS:-}"

hl_check elastic --min-nodes "$MIN_NODES" --max-nodes "$MAX_NODES"
hl_need "$HOROVODRUN" HOROVODRUN
hl_step "$HOROVODRUN" -np "$NP" \
    --min-np "$((MIN_NODES * GPUS_PER_NODE))" --max-np "$((MAX_NODES * GPUS_PER_NODE))" \
    --slots-per-host "$GPUS_PER_NODE" --host-discovery-script "$DISCOVERY_SCRIPT" \
    --elastic-timeout "$ELASTIC_TIMEOUT" "${extra_args[@]}" \
    "${TRAIN_CMD[@]}" --elastic
