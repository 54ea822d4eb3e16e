# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are read by the templates that source this file)
# Shared by the launch templates in jobs/launch (sourced, never run): the job's settings, the
# pre-launch check, the pre-flight allreduce and the train command. Each template sets JOBS_DIR
# (the jobs/ folder) before sourcing this file.
#
# Settings (environment variables; the defaults give the 1-hour ImageNet job on 32 x 8 GPUs):
#   CONFIG             YAML config of the run   (default: $JOBS_DIR/configs/goyal_1h_resnet50.yaml)
#   NODES              nodes                    (default 32)
#   GPUS_PER_NODE      GPUs per node = ranks per node, one rank per GPU (default 8)
#   DATA               data.path on the compute nodes (default: the config's)
#   DATA_REMOTE        1: DATA is not visible where the check runs (for example a /lustre mount
#                      of the compute nodes only), so the check does not look for it
#   OUTPUT             output.dir (default: the config's); the job resumes from
#                      $OUTPUT/checkpoint.pt when one is there (--resume auto)
#   TRAIN_SET          more config overrides, space-separated key=value pairs (for example
#                      "train.precision=bf16 train.seed=1"), passed as --set to the trainer
#   SYNTHETIC          1: rehearse the job on random data at tiny scale (`train --synthetic`:
#                      a few iterations per phase, outputs in <output.dir>-synthetic)
#   PYTHON             interpreter with hvd_largebatch and Horovod installed, on every node
#                      (default python3)
#   HOROVODRUN, MPIRUN the launchers (default: horovodrun / mpirun from PATH; `hvd-largebatch
#                      launch` sets them to the ones beside its Python, e.g. the venv's bin)
#   DRY_RUN            1: print the commands the job would run, run nothing (the check runs)
#   CHECKED            1: skip the check (`hvd-largebatch launch` has just done it)
#   PREFLIGHT          0: skip the pre-flight allreduce
#   PREFLIGHT_TIMEOUT  seconds the pre-flight may take before the job is abandoned (default 120)

hl_die() {
    echo "${0##*/}: error: $*" >&2
    exit 2
}

# Fill in the defaults, check the numbers, and build TRAIN_PAIRS (TRAIN_SET split), TRAIN_CMD
# and PREFLIGHT_CMD.
hl_settings() {
    CONFIG="${CONFIG:-$JOBS_DIR/configs/goyal_1h_resnet50.yaml}"
    NODES="${NODES:-32}"
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
    DATA="${DATA:-}"
    DATA_REMOTE="${DATA_REMOTE:-0}"
    OUTPUT="${OUTPUT:-}"
    TRAIN_SET="${TRAIN_SET:-}"
    PYTHON="${PYTHON:-python3}"
    HOROVODRUN="${HOROVODRUN:-horovodrun}"
    MPIRUN="${MPIRUN:-mpirun}"
    SYNTHETIC="${SYNTHETIC:-0}"
    DRY_RUN="${DRY_RUN:-0}"
    CHECKED="${CHECKED:-0}"
    PREFLIGHT="${PREFLIGHT:-1}"
    PREFLIGHT_TIMEOUT="${PREFLIGHT_TIMEOUT:-120}"
    local name
    for name in NODES GPUS_PER_NODE PREFLIGHT_TIMEOUT; do
        [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || hl_die "$name must be a positive integer, got '${!name}'"
    done
    NP=$((NODES * GPUS_PER_NODE))
    # the overrides the trainer gets: data and output first, then TRAIN_SET
    SET_ARGS=()
    if [[ -n "$DATA" ]]; then
        SET_ARGS+=(--set "data.path=$DATA")
    fi
    if [[ -n "$OUTPUT" ]]; then
        SET_ARGS+=(--set "output.dir=$OUTPUT")
    fi
    local pair
    read -r -a TRAIN_PAIRS <<< "$TRAIN_SET"
    for pair in "${TRAIN_PAIRS[@]}"; do
        [[ "$pair" == *=* ]] || hl_die "TRAIN_SET: expected key=value pairs, got '$pair'"
        SET_ARGS+=(--set "$pair")
    done
    TRAIN_CMD=("$PYTHON" -m hvd_largebatch.cli train "$CONFIG" "${SET_ARGS[@]}" --resume auto)
    if [[ "$SYNTHETIC" == 1 ]]; then
        TRAIN_CMD+=(--synthetic)
    fi
    PREFLIGHT_CMD=("$PYTHON" "$JOBS_DIR/launch/preflight.py")
}

# Horovod's documented mpirun flags: no core binding (Horovod and the data loaders start their
# own threads), ranks filled slot by slot, the environment forwarded, TCP + shared memory for
# MPI's own messages (NCCL carries the gradients), no openib BTL.
MPIRUN_FLAGS=(
    -bind-to none -map-by slot
    -x NCCL_DEBUG="${NCCL_DEBUG:-INFO}" -x LD_LIBRARY_PATH -x PATH
    -mca pml ob1 -mca btl ^openib
)

# Check the job before anything starts: `hvd-largebatch launch LAUNCHER CONFIG --check ...`
# (config, world size against every phase's global batch, per-GPU batch against
# train.max_per_rank_batch, data path, host list). Extra arguments are passed on.
hl_check() {
    local launcher="$1"
    shift
    if [[ "$CHECKED" == 1 ]]; then
        return 0
    fi
    local args=(--nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE")
    if [[ -n "$DATA" ]]; then
        args+=(--data "$DATA")
    fi
    if [[ "$DATA_REMOTE" == 1 ]]; then
        args+=(--data-remote)
    fi
    if [[ -n "$OUTPUT" ]]; then
        args+=(--output "$OUTPUT")
    fi
    if [[ "$SYNTHETIC" == 1 ]]; then
        args+=(--synthetic)
    fi
    local pair
    for pair in "${TRAIN_PAIRS[@]}"; do
        args+=(--set "$pair")
    done
    "$PYTHON" -m hvd_largebatch.cli launch "$launcher" "$CONFIG" --check "${args[@]}" "$@" \
        || hl_die "the job did not pass its check (see above); nothing was started"
}

# Die with a clear message unless the launcher command $1 (HOROVODRUN, MPIRUN) can be run here;
# under DRY_RUN=1 nothing runs, so nothing is needed.
hl_need() {
    if [[ "$DRY_RUN" != 1 ]] && ! command -v "$1" > /dev/null; then
        hl_die "$1 not found on PATH ($PATH): set $2 to its path, or start the job with" \
            "hvd-largebatch launch, which uses the one beside its Python"
    fi
}

# Print a command (shell-quoted, so that it can be pasted), then run it unless DRY_RUN=1.
hl_step() {
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@"
    fi
}

# The pre-flight allreduce under the given launcher prefix (skipped with PREFLIGHT=0).
hl_preflight() {
    if [[ "$PREFLIGHT" == 0 ]]; then
        return 0
    fi
    hl_step timeout "$PREFLIGHT_TIMEOUT" "$@" "${PREFLIGHT_CMD[@]}" \
        || hl_die "pre-flight allreduce failed or hung (more than ${PREFLIGHT_TIMEOUT} s); not starting the job"
}

# The launcher's host arguments from HOSTFILE or HOSTS (or localhost for one node), in host_args,
# and the matching `launch --check` arguments in check_args (both arrays, set for the caller).
hl_host_args() {
    HOSTFILE="${HOSTFILE:-}"
    HOSTS="${HOSTS:-}"
    host_args=()
    check_args=()
    if [[ -n "$HOSTFILE" ]]; then
        host_args=(-hostfile "$HOSTFILE")
        check_args=(--hostfile "$HOSTFILE")
    elif [[ -n "$HOSTS" ]]; then
        host_args=(-H "$HOSTS")
        check_args=(--hosts "$HOSTS")
    elif ((NODES == 1)); then
        host_args=(-H "localhost:$GPUS_PER_NODE")
    fi
}
