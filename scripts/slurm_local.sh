#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and CI (Debian/Ubuntu, root).
#
#   scripts/slurm_local.sh install   # apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server
#   scripts/slurm_local.sh up        # munge + private MariaDB + slurmdbd + slurmctld + slurmd on 127.0.0.1, wait for idle
#   scripts/slurm_local.sh status    # sinfo / squeue
#   scripts/slurm_local.sh down      # cancel jobs, stop every daemon it started (by PID file), keep the packages
#
# Accounting (slurmdbd + MariaDB) is not optional: submitit asks `sacct` for job states, and without
# it a job that SLURM kills (scancel, time limit, OOM) leaves the launcher polling forever.
# No systemd: every daemon is started by hand, its state, logs and PID files under $SLURM_LOCAL_DIR
# (default /tmp/dllm-slurm). /etc/slurm/slurm.conf and slurmdbd.conf are written with a marker line
# and are never overwritten when they lack it (a real cluster's configuration stays untouched).
set -euo pipefail

B=${SLURM_LOCAL_DIR:-/tmp/dllm-slurm}
MARKER="# written by dllm-cache-bench scripts/slurm_local.sh"
DB_PASS=dllm-slurm-local
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "needs root (daemons, /etc/slurm, /run/munge)"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "timed out after ${seconds}s waiting for $what (logs: $B/log)"
}

write_conf() {  # write_conf PATH MODE < content
    local path=$1 mode=$2
    if [[ -e $path ]] && ! grep -qF "$MARKER" "$path"; then
        die "$path exists and was not written by this script; refusing to overwrite a real configuration"
    fi
    install -d /etc/slurm
    { echo "$MARKER"; cat; } >"$path"
    chmod "$mode" "$path"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_install() {
    need_root
    local missing=()
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]} == 0)); then log "packages already installed"; return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    log "installed ${missing[*]}"
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [[ -f /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (reinstall munge)"
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
        wait_for 10 munge sh -c 'munge -n | unmunge'
        touch "$B/munged.ours"  # `down` stops only a munged that `up` started
    fi
}

start_mariadb() {
    local data=$B/mysql/data sock=$B/mysql/mysqld.sock
    install -d "$B/mysql"
    if [[ ! -d $data/mysql ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$data" \
            --auth-root-authentication-method=socket --skip-test-db >"$B/log/mariadb-install.log" 2>&1
    fi
    if ! pid_alive "$B/mysql/mariadbd.pid"; then
        setsid mariadbd --no-defaults --user=root --datadir="$data" --socket="$sock" \
            --bind-address=127.0.0.1 --port=3306 --pid-file="$B/mysql/mariadbd.pid" \
            --log-error="$B/log/mariadbd.log" </dev/null >/dev/null 2>&1 &
    fi
    wait_for 30 MariaDB mariadb-admin --no-defaults --socket="$sock" ping
    mariadb --no-defaults --socket="$sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        FLUSH PRIVILEGES;"
}

cmd_up() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' (apt, root)"
    install -d "$B/state" "$B/spool" "$B/log"
    local host mem_mib
    host=$(hostname -s)
    mem_mib=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    # NoInAddrAny (loopback-only ports) is only right when the hostname resolves to 127.*.
    local comm="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    if ! getent hosts "$host" | grep -q '^127\.'; then
        grep -q "[[:space:]]$host\$" /etc/hosts || echo "127.0.1.1 $host" >>/etc/hosts
        getent hosts "$host" | grep -q '^127\.' || comm="CommunicationParameters=NoCtldInAddrAny"
    fi
    write_conf /etc/slurm/slurmdbd.conf 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$B/slurmdbd.pid
LogFile=$B/log/slurmdbd.log
EOF
    write_conf /etc/slurm/slurm.conf 644 <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
$comm
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$B/state
SlurmdSpoolDir=$B/spool
SlurmctldPidFile=$B/slurmctld.pid
SlurmdPidFile=$B/slurmd.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    start_munge
    start_mariadb
    pid_alive "$B/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
    pid_alive "$B/slurmctld.pid" || slurmctld
    wait_for 30 slurmctld scontrol ping
    pid_alive "$B/slurmd.pid" || slurmd
    wait_for 60 "node idle" sh -c '[ "$(sinfo -h -o %T | head -1)" = idle ]'
    log "up: $(sinfo -h -o '%P %D %T %c cpus %m MiB')"
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for ((i = 0; i < 75; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "stopped $name ($pid)"
    fi
    rm -f "$file"
}

cmd_down() {
    need_root
    if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
        scancel --user=root --full 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    stop_pidfile "$B/slurmctld.pid" slurmctld
    stop_pidfile "$B/slurmd.pid" slurmd
    # The queue was drained first, so no slurmstepd should be left; name any that is (not ours to guess).
    if pgrep -x slurmstepd >/dev/null 2>&1; then
        log "warning: slurmstepd still running: $(pgrep -x slurmstepd | tr '\n' ' ')(end them by PID if they were this cluster's)"
    fi
    stop_pidfile "$B/slurmdbd.pid" slurmdbd
    stop_pidfile "$B/mysql/mariadbd.pid" mariadbd
    if [[ -f $B/munged.ours ]]; then stop_pidfile /run/munge/munged.pid munged; rm -f "$B/munged.ours"; fi
    log "down"
}

cmd_status() {
    sinfo && squeue
}

case ${1:-} in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
