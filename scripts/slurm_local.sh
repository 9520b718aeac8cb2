#!/usr/bin/env bash
# A real single-node SLURM on localhost, for tests and for trying `--profile slurm` without a
# cluster (Debian slurm-wlm 22.05 + munge; see ../shared/notes/local-slurm.md).
#
#   bash scripts/slurm_local.sh start  [DIR]   write the config, start munged/slurmctld/slurmd,
#                                              wait until the node is idle
#   bash scripts/slurm_local.sh status [DIR]   daemons and node state (exit 1 if not running)
#   bash scripts/slurm_local.sh stop   [DIR]   stop the daemons by their pid files
#
# DIR (default: $SLURM_LOCAL_DIR, else /tmp/esn-slurm) holds slurm.conf, gres.conf, state,
# spool, pid and log files. Clients (sbatch, squeue, and the srun that snakemake's jobstep
# plugin runs inside each job with SLURM_* variables, SLURM_CONF included, stripped) find the
# cluster at the default /etc/slurm/slurm.conf: start links it to DIR/etc/slurm.conf (and
# refuses to replace a real file there); stop removes the link.
# Optional env: SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_SLURMD_PORT (default 6817 / 6818).
# One node named `hostname -s` with CPUs = nproc, RealMemory = MemTotal minus headroom (at least
# 8 GB) and one fake `gpu` GRES (File=/dev/null) so that `--gpus=1` jobs schedule. No accounting:
# snakemake's profile must use `slurm-status-command: squeue` (MinJobAge=300 keeps finished jobs
# visible).
# Every finished job is also appended to DIR/log/jobcomp.txt (id, name, state, workdir, TRES).
# Installs nothing (scripts/install.sh --test installs slurm-wlm and munge). Run as root.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${SLURM_LOCAL_DIR:-/tmp/esn-slurm}}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
CONF="$DIR/etc/slurm.conf"
SYS_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"

die() { echo "slurm_local: $*" >&2; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

write_config() {
    local host ncpu mem_mb headroom
    host="$(hostname -s)"
    ncpu="$(nproc)"
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    headroom=$(( mem_mb / 10 > 1024 ? mem_mb / 10 : 1024 ))
    mem_mb=$(( mem_mb - headroom ))
    # The workflow's largest request is 8 GB (judge, probs); memory is not enforced here (no
    # cgroups), so a small machine still declares 8 GB rather than reject those jobs.
    [ "$mem_mb" -ge 8192 ] || mem_mb=8192
    mkdir -p "$DIR"/{etc,state,spool,run,log}
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: single-node SLURM on localhost.
ClusterName=esnlocal
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.txt
ReturnToService=2
# squeue-based status checks need finished jobs kept >= 3x the plugin's first-check delay.
MinJobAge=300
# Without a default every job would take all of the node's memory.
DefMemPerCPU=500
# Trust CPUs/RealMemory below even where the container's view differs from the hardware's.
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${ncpu} Sockets=1 CoresPerSocket=${ncpu} ThreadsPerCore=1 RealMemory=${mem_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Without File= the node goes INVAL; /dev/null gives a fake device for --gpus tests.
    echo "NodeName=${host} Name=gpu File=/dev/null" >"$DIR/etc/gres.conf"
}

start_munge() {
    munge_ok && return 0
    [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (apt-get install munge)"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    touch "$DIR/run/munged.ours"   # stop ends munged only if this script started it
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged did not come up"
}

node_state() { sinfo -h -o %T 2>/dev/null | head -1; }

start() {
    [ "$(id -u)" -eq 0 ] || die "run as root"
    [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] \
        || die "slurmctld/slurmd/munged not installed (apt-get install slurm-wlm munge)"
    if pid_alive "$DIR/run/slurmctld.pid" || pid_alive "$DIR/run/slurmd.pid"; then
        die "already running under $DIR (stop it first)"
    fi
    if [ -e "$SYS_CONF" ] && [ ! -L "$SYS_CONF" ]; then
        die "$SYS_CONF is a real file (a configured SLURM?); not replacing it"
    fi
    if [ -L "$SYS_CONF" ] && [ "$(readlink "$SYS_CONF")" != "$CONF" ]; then
        local other; other="$(dirname "$(dirname "$(readlink "$SYS_CONF")")")"
        pid_alive "$other/run/slurmctld.pid" \
            && die "another local SLURM runs under $other (scripts/slurm_local.sh stop $other)"
    fi
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
    write_config
    mkdir -p /etc/slurm
    ln -sfn "$CONF" "$SYS_CONF"
    start_munge
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
    /usr/sbin/slurmd -f "$CONF" -N "$(hostname -s)" || die "slurmd failed to start (see $DIR/log/slurmd.log)"
    local state=""
    for _ in $(seq 300); do
        state="$(node_state)"
        case "$state" in idle|mixed|allocated) break ;; esac
        sleep 0.1
    done
    case "$state" in
        idle|mixed|allocated) ;;
        *) tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
           die "node state '${state}' after 30 s (expected idle)" ;;
    esac
    echo "slurm_local: node $(hostname -s) ${state} ($(nproc) CPUs, gpu:1 fake) under $DIR"
    echo "slurm_local: config $CONF (linked from $SYS_CONF); logs in $DIR/log"
}

stop() {
    local f pid
    for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid"; do
        if pid_alive "$f"; then
            pid="$(cat "$f")"
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    if [ -f "$DIR/run/munged.ours" ]; then
        if pid_alive /run/munge/munged.pid; then
            pid="$(cat /run/munge/munged.pid)"
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$DIR/run/munged.ours"
    fi
    if [ -L "$SYS_CONF" ] && [ "$(readlink "$SYS_CONF")" = "$CONF" ]; then rm -f "$SYS_CONF"; fi
    echo "slurm_local: stopped ($DIR)"
}

status() {
    local ok=0 d
    for d in slurmctld slurmd; do
        if pid_alive "$DIR/run/$d.pid"; then echo "$d: running (pid $(cat "$DIR/run/$d.pid"))"
        else echo "$d: not running"; ok=1; fi
    done
    munge_ok && echo "munged: running" || { echo "munged: not running"; ok=1; }
    [ "$ok" -eq 0 ] && echo "node: $(node_state)"
    return "$ok"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
