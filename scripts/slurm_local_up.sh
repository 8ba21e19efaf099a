#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on localhost (for CI and for trying the sbatch scripts).
#
#   sudo bash scripts/slurm_local_up.sh          # idempotent; ~20 s the first time, <1 s after
#   bash scripts/slurm_local_down.sh             # stop the daemons again
#
# What it does (Debian/Ubuntu, run as root; containers without systemd or cgroups are fine):
#   1. apt-get installs slurm-wlm and munge if slurmctld/slurmd/munged are missing;
#   2. writes /etc/slurm/slurm.conf for one node named after this host (CPUs from nproc,
#      select/cons_tres, proctrack/linuxproc, task/none, no accounting, JobRequeue=1,
#      partition "debug" Default=YES, MaxTime=UNLIMITED);
#   3. creates the munge key if absent, starts munged as the munge user, then slurmctld and slurmd;
#   4. waits until sinfo shows the node idle (SLURM_LOCAL_TIMEOUT seconds, default 30) and
#      prints the daemons' logs if it does not come up.
#
# Environment knobs:
#   SLURM_LOCAL_CPUS      CPUs advertised for the node (default: nproc). More than the machine
#                         has is allowed (config_overrides), so that CI can run jobs side by side.
#   SLURM_LOCAL_CRED_EXPIRE  AuthInfo cred_expire in seconds (default 10; Slurm's default is 120).
#                         It is also the delay before a requeued job may start again.
#   SLURM_LOCAL_TIMEOUT   seconds to wait for the node to become idle (default 30).
#   SLURM_LOCAL_FORCE=1   rewrite the config and restart the daemons even if the cluster is up.
set -euo pipefail

TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

log() { echo "[slurm_local_up] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1 || true; }

# ---- 1. packages ------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi
for exe in slurmctld slurmd munged sbatch sinfo scontrol; do
    command -v "$exe" >/dev/null || die "$exe not found after installing slurm-wlm and munge"
done

# ---- 2. config --------------------------------------------------------------------------
# RealMemory: MemTotal in MiB minus 5% headroom (memory is not a consumable resource here:
# SelectTypeParameters=CR_CPU, so it only has to be <= what slurmd detects).
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd
# Resolve the node name; fall back to 127.0.0.1 when the host name does not resolve.
addr=127.0.0.1
if getent hosts "$NODE" >/dev/null; then addr=$(getent hosts "$NODE" | awk '{print $1; exit}'); fi

cat > "$CONF.new" <<EOF
# Written by scripts/slurm_local_up.sh: a one-node cluster on localhost for CI. Not for production.
ClusterName=localci
SlurmctldHost=$NODE($addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# short here so that the preemption test's requeued job restarts within seconds.
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# Containers have no usable cgroups: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# Schedule often: a requeued job (or one waiting for its BeginTime) starts within ~2 s of eligibility.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Accounting off.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Preemption support: jobs may requeue themselves (scontrol requeue) and run again.
JobRequeue=1
# Short timeouts so that a broken job or daemon shows up quickly in CI.
SlurmctldTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
ReturnToService=2
MailProg=/bin/true
# The node may advertise more CPUs than it has (SLURM_LOCAL_CPUS) without being drained.
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=$addr CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=UNLIMITED State=UP OverSubscribe=NO
EOF
changed=1
if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then changed=0; fi

# ---- fast path: already up with this config ----------------------------------------------
if [[ $changed == 0 && ${SLURM_LOCAL_FORCE:-0} != 1 ]] \
    && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && pgrep -x munged >/dev/null; then
    state=$(node_state)
    if [[ $state == idle* || $state == mix* || $state == alloc* ]]; then
        log "already up: node $NODE is $state"
        rm -f "$CONF.new"
        exit 0
    fi
fi

mv "$CONF.new" "$CONF"
chmod 644 "$CONF"
# No cgroups: make sure a stale cgroup.conf does not make slurmd try to use them.
rm -f "$CONF_DIR/cgroup.conf"

# ---- 3. munge ---------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

if ! pgrep -x munged >/dev/null; then
    log "starting munged (as munge)"
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --force
fi
for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"

# ---- 4. slurm daemons -------------------------------------------------------------------
stop_daemon() {  # name pidfile
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
    for _ in $(seq 50); do [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}
if [[ $changed == 1 || ${SLURM_LOCAL_FORCE:-0} == 1 ]]; then
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi
if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start; $(tail -20 $LOG_DIR/slurmctld.log 2>/dev/null)"
fi
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd || die "slurmd failed to start; $(tail -20 $LOG_DIR/slurmd.log 2>/dev/null)"
fi

# ---- 5. wait for the node -----------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    state=$(node_state)
    case $state in
        idle*|mix*|alloc*)
            log "up: node $NODE is $state ($CPUS CPUs, partition debug)"
            exit 0 ;;
        down*|drain*|fail*)
            if [[ $resumed == 0 ]]; then
                log "node $NODE is $state; resuming it"
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    if (( SECONDS >= deadline )); then
        log "ERROR: node $NODE not idle after ${TIMEOUT}s (state: '${state:-none}')"
        sinfo -N -l 2>&1 | sed 's/^/  sinfo: /' >&2 || true
        scontrol show node "$NODE" 2>&1 | sed 's/^/  node: /' >&2 || true
        for f in $LOG_DIR/slurmctld.log $LOG_DIR/slurmd.log /var/log/munge/munged.log; do
            echo "---- last lines of $f ----" >&2
            tail -25 "$f" >&2 2>/dev/null || true
        done
        exit 1
    fi
    sleep 0.5
done
