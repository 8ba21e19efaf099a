#!/bin/bash
# Pretrain on a Slurm cluster, preemption-safe.
#
#   sbatch slurm/pretrain.sh configs/tiny.yaml [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 --time=2-00:00:00 \
#          slurm/pretrain.sh configs/paper-162m.yaml run.out_dir=runs/162m
#   NPROC_PER_NODE=2 sbatch slurm/pretrain.sh configs/tiny.yaml      # CPU-only node, 2 ranks
#
# Submit from the repository root (or set SCALEINV_ROOT). The #SBATCH lines below are defaults:
# options on the sbatch command line override them. Everything after the config path is passed
# to launch/train.py as key=value overrides.
#
# What it does:
#   * rendezvous from the allocation: MASTER_ADDR = first node of the job, MASTER_PORT = 10000 +
#     job id % 50000 (override SCALEINV_MASTER_PORT); one launcher per node via srun, which starts
#     NPROC_PER_NODE workers (default: the node's GPUs from Slurm / CUDA_VISIBLE_DEVICES /
#     nvidia-smi, else 1);
#   * logs: the --output file below, and a copy in <run.out_dir>/logs/slurm-<jobid>.out;
#   * preemption: Slurm sends SIGUSR1 to this shell 120 s before the time limit
#     (--signal=B:USR1@120), or a preemption / `scancel --signal=USR1 --batch` does; the shell
#     forwards it to the training processes, which write a checkpoint at the next step boundary and
#     exit with code 75; the shell then runs `scontrol requeue` and the job starts again later,
#     resuming from <run.out_dir>/checkpoints/latest. A signal sent straight to the job step
#     (--signal=USR1@120 without B:, scancel --signal=USR1 JOBID) works as well. SIGTERM also makes
#     the training checkpoint, but when Slurm is already ending the job (scancel, time limit) it is
#     not requeued: resubmitting the same command resumes.
#
# Environment knobs: NPROC_PER_NODE, PYTHON (default: python on PATH), LAUNCHER (node | torchrun),
# SCALEINV_MASTER_PORT, SCALEINV_ROOT, PREEMPT_EXIT_CODE (default 75, launch/train.py's).
# Exit status: 0 when training finished or the job was requeued; else the training's status
# (2 bad config/data/checkpoint, 3 non-finite loss, 4 lost a rank / collective timeout, ...).
#
#SBATCH --job-name=scaleinv-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --gpus-per-node=8
##SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
SL_NAME=pretrain.sh
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "usage: sbatch slurm/pretrain.sh CONFIG.yaml [key=value ...]   (see docs/cluster.md)" >&2
    exit 2
fi

# lib.sh sits next to the submitted script in the repository (not next to slurmd's copy of it).
_root=${SCALEINV_ROOT:-}
if [[ -z $_root ]]; then
    _cmd=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    for _c in "${_cmd:+$(dirname "$_cmd")/..}" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
        [[ -n $_c && -f $_c/slurm/lib.sh ]] && { _root=$_c; break; }
    done
fi
if [[ -z $_root || ! -f $_root/slurm/lib.sh ]]; then
    echo "[$SL_NAME] error: cannot find the repository; submit from its root or set SCALEINV_ROOT" >&2
    exit 2
fi
# shellcheck source=lib.sh
source "$_root/slurm/lib.sh"
ROOT=$(cd "$_root" && pwd)

[[ $# -ge 1 ]] || sl_die "usage: sbatch slurm/pretrain.sh CONFIG.yaml [key=value ...]"
CONFIG=$1
shift
[[ -f $CONFIG ]] || sl_die "config $CONFIG not found (relative paths are taken from $PWD)"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
[[ -n $PYTHON ]] || sl_die "no python on PATH; activate the environment before sbatch or set PYTHON"
PREEMPT_EXIT_CODE=${PREEMPT_EXIT_CODE:-75}

# run.out_dir: the last run.out_dir=... override, else the YAML's, else the package default.
RUN_DIR=$("$PYTHON" - "$CONFIG" "$@" <<'EOF'
import os, sys, yaml
path, *overrides = sys.argv[1:]
with open(path) as f:
    tree = yaml.safe_load(f) or {}
out = (tree.get("run") or {}).get("out_dir") or "runs/default"
for arg in overrides:
    key, sep, value = arg.partition("=")
    if sep and key.strip() == "run.out_dir":
        out = str(yaml.safe_load(value)) if value else out
print(os.path.abspath(out))
EOF
) || sl_die "cannot read run.out_dir from $CONFIG"

sl_tee_log "$RUN_DIR/logs/slurm-$SLURM_JOB_ID.out"
NPROC=$(sl_nproc_per_node)
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || sl_die "NPROC_PER_NODE=$NPROC must be a positive integer"
sl_rendezvous
RESTART=${SLURM_RESTART_COUNT:-0}
SL_MARKER=""
[[ ${LAUNCHER:-node} == node ]] && SL_MARKER="$RUN_DIR/logs/.preempted-$SLURM_JOB_ID-$RESTART"
rm -f "$SL_MARKER".node* 2>/dev/null

sl_log "job $SLURM_JOB_ID (restart $RESTART) on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]," \
       "$NPROC process(es) per node, rendezvous $MASTER_ADDR:$MASTER_PORT"
sl_log "run dir $RUN_DIR; repository $ROOT; python $PYTHON"
sl_build_cmd "$ROOT/launch/train.py" --config "$CONFIG" "$@"
sl_log "running: ${SL_CMD[*]}"
sl_run_step
rc=$SL_RC

preempted=""
if compgen -G "$SL_MARKER.node*" >/dev/null 2>&1; then
    preempted="the training wrote a checkpoint and stopped"
    rm -f "$SL_MARKER".node*
elif [[ $rc == "$PREEMPT_EXIT_CODE" ]]; then
    preempted="the training exited with $PREEMPT_EXIT_CODE (checkpoint written)"
elif [[ -n $SL_SIGNALLED && $rc != 0 ]]; then
    preempted="got $SL_SIGNALLED and the training exited with $rc; it resumes from the last published checkpoint"
fi

if [[ -n $preempted ]]; then
    # scancel, the time limit and scheduler preemption also send SIGTERM: then Slurm is already
    # ending the job (JobState=COMPLETING) and requeueing would undo a user's scancel.
    state=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    if [[ -n $state && $state != RUNNING ]]; then
        sl_log "stopped: $preempted; Slurm is ending the job (JobState=$state: scancel, time limit" \
               "or scheduler preemption), so it is not requeued here; submitting the same command" \
               "again resumes from the checkpoint"
        sl_close_log
        exit "$PREEMPT_EXIT_CODE"
    fi
    sl_log "preempted: $preempted; requeueing job $SLURM_JOB_ID"
    sl_close_log
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "[$SL_NAME] error: scontrol requeue $SLURM_JOB_ID failed (job not requeueable?);" \
         "resubmit the same command to resume" >&2
    exit "$PREEMPT_EXIT_CODE"
fi
if [[ $rc == 0 ]]; then
    sl_log "training finished"
else
    sl_log "training failed with exit status $rc (see the log above)"
fi
sl_close_log
exit "$rc"
