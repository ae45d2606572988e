#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld + slurmd + munge) on localhost, for the SLURM tests
# and for trying scripts/slurm/train.sbatch without a cluster.
#
#   scripts/slurm/local_cluster.sh start [STATE_DIR]   install if missing, start (idempotent)
#   scripts/slurm/local_cluster.sh status [STATE_DIR]  exit 0 when all three daemons run
#   scripts/slurm/local_cluster.sh stop [STATE_DIR]    cancel its jobs, stop the daemons
#   eval "$(scripts/slurm/local_cluster.sh start)"     start and export SLURM_CONF in one go
#
# Everything (config, munge key and socket, spool, state, logs, pid files) lives under STATE_DIR:
# the argument, else $MTP_SLURM_DIR, else /tmp/mtp-slurm. Nothing is written to /etc. `start`
# prints `export SLURM_CONF=STATE_DIR/slurm.conf` on stdout (all other messages go to stderr).
#
# Needs root (the daemons run as root, no systemd) and a Debian/Ubuntu with apt for the install
# (slurmctld slurmd slurm-client munge, no recommends; `apt-get update` is run if the first try
# fails). Environment:
#   MTP_SLURM_DIR         state directory (default /tmp/mtp-slurm)
#   MTP_SLURMCTLD_PORT    slurmctld port (default 6817); MTP_SLURMD_PORT slurmd port (default 6818)
#   MTP_SLURM_NO_INSTALL  1: never run apt-get; fail if the binaries are missing
#
# Settings that matter (measured on these machines; docs/DESIGN.md, Tests): proctrack/linuxproc +
# task/none (no cgroups), no accounting (so no sacct: use `scontrol show job`), cred_expire=5 (else a requeued job waits
# 120 s before it may run again), batch_sched_delay=0,sched_interval=2 (reruns start at once),
# ReturnToService=2 (the node comes back by itself after a restart).
set -euo pipefail

cmd=${1:-}
S=${2:-${MTP_SLURM_DIR:-/tmp/mtp-slurm}}
CTLD_PORT=${MTP_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${MTP_SLURMD_PORT:-6818}
CONF=$S/slurm.conf
MUNGE_SOCKET=$S/munge/run/munge.socket.2

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() {  # pid_alive PIDFILE -> 0 when the process named in it runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch scontrol munged mungekey; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    (( missing )) || return 0
    [[ ${MTP_SLURM_NO_INSTALL:-0} == 1 ]] && die "SLURM/munge not installed and MTP_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || die "SLURM/munge not installed and no apt-get to install them"
    (( EUID == 0 )) || die "installing SLURM needs root (apt-get)"
    say "installing slurmctld slurmd slurm-client munge (apt-get, no recommends)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$S/apt.log" 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update -qq >>"$S/apt.log" 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$S/apt.log" 2>&1 \
            || die "apt-get install failed; see $S/apt.log"
    fi
}

write_config() {
    local node host
    host=$(hostname -s)
    # The node line as slurmd measures it (CPUs, sockets, cores, memory), minus the UpTime line.
    node=$(slurmd -C | grep '^NodeName=')
    [[ -n $node ]] || die "slurmd -C printed no NodeName line"
    cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a single-node test cluster, state under $S.
ClusterName=mtp-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    pid_alive "$S/munge/munged.pid" && return 0
    mkdir -p "$S/munge/run"
    chmod 700 "$S/munge"
    chmod 755 "$S/munge/run"  # clients (sbatch, srun, slurmstepd) must reach the socket
    if [[ ! -s $S/munge/munge.key ]]; then
        mungekey --create --keyfile="$S/munge/munge.key" >/dev/null
    fi
    chmod 400 "$S/munge/munge.key"
    munged --socket="$MUNGE_SOCKET" --key-file="$S/munge/munge.key" \
        --pid-file="$S/munge/munged.pid" --log-file="$S/log/munged.log" \
        --seed-file="$S/munge/munged.seed" --force \
        || die "munged did not start; see $S/log/munged.log"
}

start() {
    mkdir -p "$S"
    install_packages
    mkdir -p "$S/state" "$S/spool" "$S/run" "$S/log"
    chmod 755 "$S"
    if pid_alive "$S/run/slurmctld.pid" && pid_alive "$S/run/slurmd.pid" \
            && pid_alive "$S/munge/munged.pid"; then
        say "already running (state in $S)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    [[ -f $CONF ]] || write_config
    start_munge
    export SLURM_CONF=$CONF
    if ! pid_alive "$S/run/slurmctld.pid"; then
        slurmctld -f "$CONF" || die "slurmctld did not start; see $S/log/slurmctld.log"
    fi
    if ! pid_alive "$S/run/slurmd.pid"; then
        slurmd -f "$CONF" || die "slurmd did not start; see $S/log/slurmd.log"
    fi
    # Wait until the node takes jobs (a drained/down node from an earlier run is resumed).
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
        case $state in
            idle*|mixed*|allocated*|completing*) break ;;
            down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case $state in
        idle*|mixed*|allocated*|completing*) ;;
        *) die "the node is not ready (state '${state:-unknown}'); see $S/log/slurmctld.log and $S/log/slurmd.log" ;;
    esac
    say "running: slurmctld $(cat "$S/run/slurmctld.pid"), slurmd $(cat "$S/run/slurmd.pid"), munged $(cat "$S/munge/munged.pid"); node $state; state in $S"
    echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 file=$2 pid
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) ignored SIGTERM; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    say "stopped $name ($pid)"
}

stop() {
    if pid_alive "$S/run/slurmctld.pid" && [[ -f $CONF ]]; then
        export SLURM_CONF=$CONF
        local -a jobs
        mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null || true)
        if ((${#jobs[@]})); then
            say "cancelling jobs: ${jobs[*]}"
            scancel "${jobs[@]}" 2>/dev/null || true
            for _ in $(seq 1 75); do
                [[ -z $(squeue -h -o '%i' 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_pidfile slurmd "$S/run/slurmd.pid"
    stop_pidfile slurmctld "$S/run/slurmctld.pid"
    stop_pidfile munged "$S/munge/munged.pid"
}

status() {
    local rc=0 name file
    for name in slurmctld slurmd munged; do
        file=$S/run/$name.pid
        [[ $name == munged ]] && file=$S/munge/munged.pid
        if pid_alive "$file"; then
            say "$name running (pid $(cat "$file"))"
        else
            say "$name not running"
            rc=3
        fi
    done
    if (( rc == 0 )); then
        SLURM_CONF=$CONF sinfo >&2 || rc=3
        echo "export SLURM_CONF=$CONF"
    fi
    return $rc
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]   (default \$MTP_SLURM_DIR or /tmp/mtp-slurm)" >&2
       exit 2 ;;
esac
