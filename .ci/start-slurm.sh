#!/usr/bin/env bash
# Starts a throw-away single-node Slurm for the Slurm tests and prints one line for the caller to eval:
#   eval "$(bash .ci/start-slurm.sh)"
#   -> export SLURM_CONF=/tmp/eqrl-slurm/slurm.conf
# Debian's packages (installed if missing), no systemd, no cgroups: munged; MariaDB + slurmdbd, so that `sacct`
# works as on a real cluster; slurmctld; slurmd for one node called localhost with this machine's CPUs and memory.
# Partitions: "ci" (default) and "urgent", whose jobs preempt those of "ci" (PreemptMode=REQUEUE). Jobs run as the
# submitting user (root is allowed). Configuration, state, database and daemon logs live in $EQRL_SLURM_DIR (default
# /tmp/eqrl-slurm, a folder of its own); the daemons listen on ports 6917-6920 of 127.0.0.1, never on Slurm's
# default ports. Re-running it while the cluster is up with the same configuration only prints the line again;
# otherwise it stops the daemons it started earlier and starts a clean cluster (no old jobs, job ids from 1).
# EQRL_SLURM_ACCOUNTING=0 skips MariaDB and slurmdbd (then `sacct` says accounting is disabled).
# Everything except the export line goes to stderr. Needs root.
set -euo pipefail

DIR="${EQRL_SLURM_DIR:-/tmp/eqrl-slurm}"
CONF="$DIR/slurm.conf"
ACCOUNTING="${EQRL_SLURM_ACCOUNTING:-1}"
CLUSTER="eqrl-ci"
CTLD_PORT=6917
SLURMD_PORT=6918
DBD_PORT=6919
DB_PORT=6920
DB_DIR="$DIR/mariadb"
# A requeued job may start again only once its job credential expired: cred_expire + 1 s after the requeue
# (Slurm's default cred_expire is 120 s). 10 s keeps the requeue test short.
CRED_EXPIRE=10

log() { echo "start-slurm: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: runs COMMAND (10 s at most) every 0.2 s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until timeout 10 "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up in time"
        sleep 0.2
    done
}

[ "$(id -u)" = "0" ] || die "must run as root (it starts munged, MariaDB and the Slurm daemons)"

packages=()
command -v munged >/dev/null || packages+=(munge)
for cmd in slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || packages+=(slurm-wlm); done
if [ "$ACCOUNTING" = "1" ]; then
    command -v slurmdbd >/dev/null || packages+=(slurmdbd)
    command -v mariadbd >/dev/null || packages+=(mariadb-server)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
    log "installing Debian's ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${packages[@]}" >&2
fi

# ---- slurm.conf -----------------------------------------------------------------------------------------------
if [ "$ACCOUNTING" = "1" ]; then
    accounting_conf="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux"
else
    accounting_conf="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

CPUS="$(nproc)"
MEM_MB="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
[ -n "$MEM_MB" ] || MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)"
CONF_TEXT="$(cat <<EOF
# Single-node Slurm for CI, written by .ci/start-slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups and no systemd: processes are tracked through /proc, no task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$accounting_conf
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s and 30 s), so a requeued job starts once it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
JobRequeue=1
# As on most clusters: SIGTERM at the time limit, SIGKILL 30 s later.
KillWait=30
# Finished jobs stay visible to scontrol for an hour.
MinJobAge=3600
# Jobs that ask for no memory get their share of the node, so that one job per CPU can run.
DefMemPerCPU=$((MEM_MB / CPUS))
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# Preemption as on clusters with a preemptible partition: a job of "urgent" requeues a job of "ci" when the node is
# full (SIGTERM, then SIGKILL after KillWait, then Slurm requeues the job).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
)"

export SLURM_CONF="$CONF"

node_state() { sinfo -h -N -n localhost -p ci -o %T 2>/dev/null || true; }
cluster_up() {
    [ -s "$CONF" ] && [ "$(cat "$CONF")" = "$CONF_TEXT" ] || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    # idle, or busy when re-run during a test session
    node_state | grep -q -E '^(idle|mixed|allocated|completing)$' || return 1
    if [ "$ACCOUNTING" = "1" ]; then
        [ "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null)" = "$CLUSTER" ] || return 1
    fi
}

if cluster_up; then
    log "already up: $CONF ($(sinfo -h -N -n localhost -p ci -o '%T, %c CPUs, %m MB'))"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# ---- stop what an earlier start left behind, start clean -------------------------------------------------------
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid" "$DB_DIR/mariadbd.pid"; do
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid="$(cat "$pidfile")"
        log "stopping $pid ($pidfile)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
done
rm -rf "$DIR/state" "$DIR/spool" "$DB_DIR"
rm -f "$DIR"/*.log "$DIR"/*.pid "$DIR/slurmdbd.conf"
mkdir -p "$DIR/state" "$DIR/spool"
chmod 755 "$DIR"

# ---- munge ----------------------------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key >&2
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    log "starting munged"
    runuser -u munge -- munged >&2
    wait_for 10 munged bash -c 'munge -n | unmunge'
fi

# ---- slurm.conf first: sacctmgr finds slurmdbd through it --------------------------------------------------------
log "writing $CONF: node localhost, $CPUS CPUs, $MEM_MB MB"
printf '%s\n' "$CONF_TEXT" >"$CONF"

# ---- accounting: MariaDB on 127.0.0.1:$DB_PORT, slurmdbd on localhost:$DBD_PORT ------------------------------------
if [ "$ACCOUNTING" = "1" ]; then
    install -d -o mysql -g mysql -m 700 "$DB_DIR"
    log "initialising MariaDB in $DB_DIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" --skip-test-db \
        --auth-root-authentication-method=socket >"$DIR/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $DIR/mariadb-install.log"
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" --socket="$DB_DIR/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DB_DIR/mariadbd.pid" \
        --log-error="$DB_DIR/mariadbd.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB (log $DB_DIR/mariadbd.log)" mariadb-admin --no-defaults --socket="$DB_DIR/mysqld.sock" ping
    db_password="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    mariadb --no-defaults --socket="$DB_DIR/mysqld.sock" -u root -e "
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_password';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    (
        umask 077
        cat >"$DIR/slurmdbd.conf" <<EOF
# slurmdbd for the CI Slurm, written by .ci/start-slurm.sh (mode 600: it holds a password made at start-up)
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_password
StorageLoc=slurm_acct_db
LogFile=$DIR/slurmdbd.log
PidFile=$DIR/slurmdbd.pid
EOF
    )
    log "starting slurmdbd (log $DIR/slurmdbd.log)"
    slurmdbd >&2 # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 60 "slurmdbd (log $DIR/slurmdbd.log)" sacctmgr -n show cluster format=cluster
    sacctmgr -i add cluster "$CLUSTER" >&2
fi

# ---- slurmctld and slurmd -----------------------------------------------------------------------------------------
log "starting slurmctld (log $DIR/slurmctld.log)"
slurmctld -c >&2
wait_for 30 "slurmctld (log $DIR/slurmctld.log)" bash -c 'scontrol ping | grep -q "is UP"'
log "starting slurmd (log $DIR/slurmd.log)"
slurmd -N localhost >&2
# shellcheck disable=SC2016 # expanded by the inner bash
wait_for 30 "node localhost (log $DIR/slurmd.log)" bash -c '[ "$(sinfo -h -N -n localhost -p ci -o %T)" = idle ]'
log "ready: partitions ci and urgent, node localhost idle ($CPUS CPUs, $MEM_MB MB), accounting=$ACCOUNTING"

echo "export SLURM_CONF=$CONF"
