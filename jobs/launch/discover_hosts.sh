#!/usr/bin/env bash
# Host discovery for `horovodrun --host-discovery-script` (horovodrun_elastic.sh): prints the
# hosts that may run ranks now, one `host:slots` line each. horovodrun calls it every few
# seconds; a host that disappears from the list is removed from the job, a new one is added.
#
# Sources, first found wins:
#   ELASTIC_HOSTS_FILE   a file that the cluster's tooling keeps current: one `host` or
#                        `host:slots` per line, `#` comments and blank lines ignored
#   SLURM_JOB_NODELIST   the nodes of the SLURM allocation this runs in
# A host without an explicit slot count gets GPUS_PER_NODE slots (default 8).
set -euo pipefail
slots="${GPUS_PER_NODE:-8}"
if [[ -n "${ELASTIC_HOSTS_FILE:-}" ]]; then
    [[ -r "$ELASTIC_HOSTS_FILE" ]] || {
        echo "discover_hosts.sh: cannot read ELASTIC_HOSTS_FILE=$ELASTIC_HOSTS_FILE" >&2
        exit 1
    }
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%%#*}"
        line="${line//[[:space:]]/}"
        if [[ -z "$line" ]]; then
            continue
        elif [[ "$line" == *:* ]]; then
            echo "$line"
        else
            echo "$line:$slots"
        fi
    done < "$ELASTIC_HOSTS_FILE"
elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" | while IFS= read -r host; do
        echo "$host:$slots"
    done
else
    echo "discover_hosts.sh: set ELASTIC_HOSTS_FILE (one host[:slots] per line) or run inside a SLURM allocation" >&2
    exit 1
fi
