#!/usr/bin/env bash
# Stop the daemons started by .ci/slurm/up.sh (via their pid files only).
#   bash .ci/slurm/down.sh            # cancel this cluster's jobs, stop daemons, keep state
#   bash .ci/slurm/down.sh --purge    # ... and delete $FORGE_SLURM_DIR (next up.sh starts fresh)
# FORGE_SLURM_KEEP_JOBS=1 skips cancelling queued/running jobs first.
set -euo pipefail
. "$(dirname "$0")/common.sh"

purge=0
[ "${1:-}" = "--purge" ] && purge=1

if [ -f "$SLURM_CONF_FILE" ] && [ "${FORGE_SLURM_KEEP_JOBS:-0}" != 1 ] && pid_alive "$CTLD_PID" slurmctld; then
  export SLURM_CONF=$SLURM_CONF_FILE
  jobs=$(timeout 20 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 20 scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

stop_pid "$SLURMD_PID" slurmd
stop_pid "$CTLD_PID" slurmctld
stop_pid "$DBD_PID" slurmdbd
stop_pid "$DB_PID" mariadbd
stop_pid "$MUNGE_PID" munged

if [ $purge = 1 ]; then
  case "$D" in
    / | /var | /var/lib | "") echo "refusing to purge $D" >&2; exit 1 ;;
  esac
  log "removing $D"
  rm -rf "$D"
  rm -f "$REPO_ENV_FILE"
fi
log "forge-slurm down"
