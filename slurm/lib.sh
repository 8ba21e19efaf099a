# Shared by slurm/pretrain.sh and slurm/eval.sh (sourced; bash). See docs/cluster.md.

sl_log() { echo "[$SL_NAME $(date +%H:%M:%S)] $*"; }
sl_die() { sl_log "error: $*" >&2; exit "${2:-2}"; }

# Worker processes per node: $NPROC_PER_NODE, else the GPUs Slurm gave this node, else the GPUs
# visible here, else 1 (CPU-only nodes: set NPROC_PER_NODE and --cpus-per-task yourself).
sl_nproc_per_node() {
    local n=""
    if [[ -n ${NPROC_PER_NODE:-} ]]; then
        echo "$NPROC_PER_NODE"  # validated by the caller
        return
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
        n=$SLURM_GPUS_ON_NODE
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || n=1
    echo "$n"
}

# Rendezvous from the allocation: the first node of the job, and a port derived from the job id
# (so two jobs sharing a node do not collide on a fixed port). Override: SCALEINV_MASTER_PORT.
sl_rendezvous() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $MASTER_ADDR ]] || sl_die "cannot read the node list (SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-})"
    MASTER_PORT=${SCALEINV_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}
    export MASTER_ADDR MASTER_PORT
}

# Duplicate this script's output into a per-job log file (the #SBATCH --output file keeps it too).
# The tee ignores the preemption signals so that `scancel --full --signal=USR1` does not cut the log.
sl_tee_log() {
    mkdir -p "$(dirname "$1")" || sl_die "cannot create $(dirname "$1")"
    exec 3>&1 4>&2
    exec > >(trap '' USR1 USR2 TERM INT HUP; exec tee -a "$1") 2>&1
    SL_TEE_PID=$!
}

# Restore the original output and let tee finish writing the per-job log.
sl_close_log() {
    if [[ -n ${SL_TEE_PID:-} ]]; then
        exec 1>&3 2>&4
        wait "$SL_TEE_PID" 2>/dev/null || true
        SL_TEE_PID=""
    fi
}

# The command that runs `$@` (a program and its arguments) on every node of the allocation, one
# launcher per node, in the array SL_CMD.
#   LAUNCHER=node (default): slurm/node_launcher.py, which returns the workers' exit status;
#   LAUNCHER=torchrun: torchrun (its exit status is 1 for any worker failure, so preemption is
#   then recognised only from the signal the batch shell received).
sl_build_cmd() {
    local srun=(srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES"
                --ntasks-per-node=1 --export=ALL)
    # srun (>= 22.05) does not inherit --cpus-per-task from the batch job: pass it on.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    case ${LAUNCHER:-node} in
        node)
            SL_CMD=("${srun[@]}" "$PYTHON" -u "$ROOT/slurm/node_launcher.py"
                    --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC"
                    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
                    --preempt-exit-code "$PREEMPT_EXIT_CODE" ${SL_MARKER:+--preempt-marker "$SL_MARKER"}
                    -- "$@") ;;
        torchrun)
            local extra=""
            if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- --signals-to-handle; then
                extra="--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=${TORCHRUN_SHUTDOWN_TIMEOUT:-600}"
            else
                sl_log "warning: this torchrun cannot forward SIGUSR1 (torch too old); use LAUNCHER=node"
            fi
            # SLURM_NODEID must be read inside each srun task, not in this (node 0) batch shell.
            SL_CMD=("${srun[@]}" bash -c 'exec "$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" \
                    --node_rank="$SLURM_NODEID" "$@"' "$PYTHON"
                    --nproc_per_node="$NPROC" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
                    $extra "$@") ;;
        *) sl_die "LAUNCHER=${LAUNCHER} is not one of: node, torchrun" ;;
    esac
}

# Run SL_CMD in the background and wait for it; SIGUSR1 / SIGTERM to this batch shell are
# forwarded to the job step as SIGUSR1 (srun passes it to every task; the training loop checkpoints
# at the next step boundary and exits). Sets SL_RC and SL_SIGNALLED.
sl_run_step() {
    SL_SIGNALLED=""
    SL_STEP_PID=""
    trap 'sl_on_signal USR1' USR1
    trap 'sl_on_signal TERM' TERM
    trap 'sl_on_signal INT' INT
    "${SL_CMD[@]}" &
    SL_STEP_PID=$!
    while :; do
        wait "$SL_STEP_PID"
        SL_RC=$?
        if (( SL_RC > 128 )) && kill -0 "$SL_STEP_PID" 2>/dev/null; then continue; fi  # a trap ran
        break
    done
    trap - USR1 TERM INT
}

sl_on_signal() {
    SL_SIGNALLED="${SL_SIGNALLED:+$SL_SIGNALLED,}SIG$1"
    if [[ -n $SL_STEP_PID ]] && kill -0 "$SL_STEP_PID" 2>/dev/null; then
        sl_log "got SIG$1: asking the training processes to checkpoint and stop (SIGUSR1 via srun)"
        kill -USR1 "$SL_STEP_PID" 2>/dev/null || true
    else
        sl_log "got SIG$1"
    fi
}
