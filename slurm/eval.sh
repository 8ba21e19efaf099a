#!/bin/bash
# Evaluate a trained run (launch/eval.py) on a Slurm cluster.
#
#   sbatch slurm/eval.sh RUN_DIR [launch/eval.py options and key=value overrides ...]
#   sbatch slurm/eval.sh runs/tiny --multiples 1,4,16 --max-tokens 65536
#   sbatch --gpus-per-node=4 slurm/eval.sh runs/162m --lengths 65536 parallel.context_parallel_size=4
#
# Submit from the repository root (or set SCALEINV_ROOT). The #SBATCH lines are defaults that the
# sbatch command line overrides. Rendezvous and launch as in slurm/pretrain.sh: one launcher per
# node (srun), NPROC_PER_NODE workers per node (default: the node's GPUs, else 1); the workers are
# data-parallel replicas, or context-parallel groups with parallel.context_parallel_size=N.
# Output: the --output file and <RUN_DIR>/logs/eval-<jobid>.out; results in <RUN_DIR>/eval.json.
# Evaluation is not checkpointed: a preempted evaluation simply runs again from the start.
#
#SBATCH --job-name=scaleinv-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --gpus-per-node=1
##SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
SL_NAME=eval.sh
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "usage: sbatch slurm/eval.sh RUN_DIR [launch/eval.py args ...]   (see docs/cluster.md)" >&2
    exit 2
fi
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

[[ $# -ge 1 ]] || sl_die "usage: sbatch slurm/eval.sh RUN_DIR [launch/eval.py args ...]"
RUN_DIR=$1
shift
[[ -f $RUN_DIR/config.yaml ]] || sl_die "$RUN_DIR is not a run directory (no config.yaml); pass a training run's run.out_dir"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
[[ -n $PYTHON ]] || sl_die "no python on PATH; activate the environment before sbatch or set PYTHON"
PREEMPT_EXIT_CODE=${PREEMPT_EXIT_CODE:-75}

sl_tee_log "$RUN_DIR/logs/eval-$SLURM_JOB_ID.out"
NPROC=$(sl_nproc_per_node)
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || sl_die "NPROC_PER_NODE=$NPROC must be a positive integer"
sl_rendezvous
SL_MARKER=""
sl_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]," \
       "$NPROC process(es) per node, rendezvous $MASTER_ADDR:$MASTER_PORT; run $RUN_DIR"
sl_build_cmd "$ROOT/launch/eval.py" --run "$RUN_DIR" "$@"
sl_log "running: ${SL_CMD[*]}"
"${SL_CMD[@]}"
rc=$?
if [[ $rc == 0 ]]; then sl_log "evaluation finished"; else sl_log "evaluation failed with exit status $rc"; fi
sl_close_log
exit "$rc"
