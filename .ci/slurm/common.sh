# shellcheck shell=bash disable=SC2034
# Shared settings for up.sh / down.sh / check.sh (sourced, not run).
# Every path and port can be overridden from the environment.

FORGE_SLURM_DIR=${FORGE_SLURM_DIR:-/var/lib/forge-slurm}
FORGE_SLURM_CLUSTER=${FORGE_SLURM_CLUSTER:-forge-ci}
FORGE_SLURM_PARTITION=${FORGE_SLURM_PARTITION:-debug}
FORGE_SLURM_CPUS=${FORGE_SLURM_CPUS:-8}
FORGE_SLURMCTLD_PORT=${FORGE_SLURMCTLD_PORT:-16817}
FORGE_SLURMD_PORT=${FORGE_SLURMD_PORT:-16818}
FORGE_SLURMDBD_PORT=${FORGE_SLURMDBD_PORT:-16819}
FORGE_MARIADB_PORT=${FORGE_MARIADB_PORT:-16306}
# seconds a requeued job waits before it may start again (Slurm's default is 120)
FORGE_SLURM_CRED_EXPIRE=${FORGE_SLURM_CRED_EXPIRE:-10}

SLURM_CI_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

D=$FORGE_SLURM_DIR
ETC=$D/etc
LOG=$D/log
RUN=$D/run
MUNGE_DIR=$D/munge
MUNGE_SOCK=$MUNGE_DIR/munged.sock
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_LOG=$MUNGE_DIR/munged.log
DB_DIR=$D/mariadb
DB_DATA=$DB_DIR/data
DB_SOCK=$DB_DIR/mariadb.sock
DB_PID=$DB_DIR/mariadb.pid
DB_LOG=$DB_DIR/mariadb.log
SLURM_CONF_FILE=$ETC/slurm.conf
SLURMDBD_CONF_FILE=$ETC/slurmdbd.conf
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
DBD_PID=$RUN/slurmdbd.pid
CTLD_LOG=$LOG/slurmctld.log
SLURMD_LOG=$LOG/slurmd.log
DBD_LOG=$LOG/slurmdbd.log
ENV_FILE=$D/env
REPO_ENV_FILE=$SLURM_CI_HERE/env

log() { printf '[forge-slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# pid_alive PIDFILE COMM: the pid in PIDFILE is alive and its process name is COMM.
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc 0-9 <"$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# proc_is PID COMM: PID is alive (not a zombie) and named COMM.
proc_is() {
  [ -r "/proc/$1/stat" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] &&
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# stop_pid PIDFILE COMM [TIMEOUT]: TERM, wait (default 30 s), then KILL. Only the pid in PIDFILE.
stop_pid() {
  local pidfile=$1 comm=$2 timeout=${3:-30} pid i
  if ! pid_alive "$pidfile" "$comm"; then
    rm -f "$pidfile"
    return 0
  fi
  pid=$(tr -dc 0-9 <"$pidfile")
  log "stopping $comm (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 5; i++)); do
    proc_is "$pid" "$comm" || break
    sleep 0.2
  done
  if proc_is "$pid" "$comm"; then
    log "$comm (pid $pid) still alive after ${timeout}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
}
