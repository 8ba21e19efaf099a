#!/usr/bin/env bash
# Stop the one-node localhost Slurm cluster started by scripts/slurm_local_up.sh.
#   bash scripts/slurm_local_down.sh            # stop slurmd, slurmctld, munged
#   bash scripts/slurm_local_down.sh --purge    # also forget queued jobs (controller state)
# Idempotent: daemons that are not running are skipped. Only the daemons started from the
# pid files written by slurm_local_up.sh (and munged's pid file) are signalled.
set -uo pipefail

RUN_DIR=/run/slurm
log() { echo "[slurm_local_down] $*" >&2; }

stop() {  # name pidfile
    local name=$1 pidfile=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name not running"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "$name did not stop in 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

# Cancel jobs first so their processes do not outlive slurmd.
if command -v scancel >/dev/null && [[ -f /etc/slurm/slurm.conf ]]; then
    scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
fi
stop slurmd "$RUN_DIR/slurmd.pid"
stop slurmctld "$RUN_DIR/slurmctld.pid"
stop munged /run/munge/munged.pid
if [[ ${1:-} == --purge ]]; then
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
    log "purged controller and slurmd state"
fi
exit 0
