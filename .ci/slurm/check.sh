#!/usr/bin/env bash
# Prove the cluster from up.sh does what forge/submitit rely on. Exits non-zero on the first failure.
#   bash .ci/slurm/check.sh
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ -f "$ENV_FILE" ] || { echo "no $ENV_FILE: run .ci/slurm/up.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$ENV_FILE"

T0=$(date +%s)
W=$(mktemp -d "$FORGE_SLURM_DIR/check.XXXXXX")
chmod 755 "$W"
cd "$W"
SB=(sbatch --parsable --chdir="$W" --job-name=forge-check)
PASS=0

cleanup() {
  local ids
  ids=$(squeue -h -n forge-check -o %A 2>/dev/null | tr '\n' ' ' || true)
  # shellcheck disable=SC2086
  if [ -n "${ids// /}" ]; then scancel $ids 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT

ok() { PASS=$((PASS + 1)); printf 'ok   %-34s %s\n' "$1" "${2:-}"; }
fail() {
  local j
  printf 'FAIL %s\n' "$1" >&2
  shift
  for j in "$@"; do
    echo "--- scontrol show job $j" >&2
    scontrol show job "$j" >&2 2>/dev/null || echo "(gone from slurmctld)" >&2
    echo "--- sacct -D -j $j" >&2
    sacct -D -j "$j" -o JobID%16,State%20,ExitCode,Start,End >&2 || true
  done
  echo "--- squeue" >&2
  squeue >&2 || true
  echo "--- tail slurmctld.log" >&2
  tail -n 25 "$CTLD_LOG" >&2 || true
  echo "--- tail slurmd.log" >&2
  tail -n 15 "$SLURMD_LOG" >&2 || true
  exit 1
}

jstate() { squeue -h -j "$1" -o %T 2>/dev/null | head -n1; } # empty once it left the queue
astate() { sacct -n -X -P -j "$1" -o State 2>/dev/null | head -n1; }

# until_ SECONDS CMD...: poll CMD every 0.2 s; non-zero on timeout
until_() {
  local end=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
}
is_running() { [ "$(jstate "$1")" = RUNNING ]; }
acct_is() { [[ "$(astate "$1")" =~ ^$2 ]]; }
file_has() { [ -f "$1" ] && grep -q "$2" "$1"; }

# ---------------------------------------------------------------- submitted first, checked last:
# submitit's preemption path. --signal=USR2@50 with --time=1 (the step gets USR2 ~10-40 s in,
# slurmctld checks time limits every 30 s); the step's handler requeues the job, like submitit does;
# the second run (SLURM_RESTART_COUNT=1) finishes. --open-mode=append: a requeued job otherwise
# truncates its --output file.
cat >"$W/preempt.sh" <<'EOF'
#!/bin/bash
#SBATCH --time=1 --signal=USR2@50 --output=preempt.out --open-mode=append
echo "run ${SLURM_RESTART_COUNT:-0} start $(date +%s)"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo "second run done"; exit 0; fi
srun --unbuffered bash -c 'trap "echo step got USR2 at \$(date +%s); scontrol requeue \$SLURM_JOB_ID; exit 0" USR2; sleep 120 & wait'
echo "srun returned $?"
sleep 60
EOF
PRE=$("${SB[@]}" "$W/preempt.sh")
# batch-shell variant: B:USR2 goes to the batch script itself
BSIG=$("${SB[@]}" --time=1 --signal=B:USR2@50 --output=bsig.out \
  --wrap 'trap "echo batch got USR2; exit 0" USR2; sleep 120 & wait')

# ---------------------------------------------------------------- 1. sbatch --wait
J=$("${SB[@]}" --wait --output=hostname.out --wrap hostname) || fail "sbatch --wait --wrap hostname (rc=$?)" "$J"
[ "$(cat hostname.out)" = "$(hostname)" ] || fail "hostname output: '$(cat hostname.out)'" "$J"
until_ 20 acct_is "$J" COMPLETED || fail "sacct state of $J: '$(astate "$J")'" "$J"
ok "sbatch --wait --wrap hostname" "job $J -> $(cat hostname.out), sacct COMPLETED"

# ---------------------------------------------------------------- 2. array with throttle %2
A=$("${SB[@]}" --array=0-5%2 --output=array_%a.out --wrap 'sleep 3; echo $SLURM_ARRAY_TASK_ID')
maxrun=0
end=$(($(date +%s) + 90))
while [ -n "$(squeue -h -r -j "$A" -o %i 2>/dev/null)" ]; do
  n=$(squeue -h -r -j "$A" -t RUNNING,COMPLETING -o %i 2>/dev/null | wc -l)
  [ "$n" -gt "$maxrun" ] && maxrun=$n
  [ "$n" -le 2 ] || fail "array $A: $n tasks running at once (limit 2)" "$A"
  [ "$(date +%s)" -lt "$end" ] || fail "array $A did not finish in 90 s" "$A"
  sleep 0.3
done
[ "$maxrun" = 2 ] || fail "array $A: never saw 2 tasks running at once (max $maxrun)" "$A"
done_n() { [ "$(sacct -n -X -P -j "$A" -o State | grep -c '^COMPLETED')" = 6 ]; }
until_ 20 done_n || fail "array $A: sacct: $(sacct -n -X -P -j "$A" -o JobID,State | tr '\n' ' ')" "$A"
for i in 0 1 2 3 4 5; do [ "$(cat array_$i.out)" = "$i" ] || fail "array task $i output" "$A"; done
ok "array 0-5%2 of sleep 3" "job $A, max running $maxrun, 6 tasks COMPLETED in $(($(date +%s) - end + 90)) s"

# ---------------------------------------------------------------- 3. afterok on success
P=$("${SB[@]}" --output=/dev/null --wrap 'sleep 2')
C=$("${SB[@]}" --dependency=afterok:"$P" --output=child.out --wrap 'echo child ran')
[ "$(squeue -h -j "$C" -o %r)" = Dependency ] || fail "child $C should wait with reason Dependency, is $(squeue -h -j "$C" -o '%T/%r')" "$C"
until_ 40 acct_is "$C" COMPLETED || fail "afterok child $C: '$(astate "$C")'" "$P" "$C"
pend=$(sacct -n -X -P -j "$P" -o End)
cstart=$(sacct -n -X -P -j "$C" -o Start)
[[ "$cstart" > "$pend" || "$cstart" == "$pend" ]] || fail "child started $cstart before parent ended $pend" "$P" "$C"
file_has child.out 'child ran' || fail "child output" "$C"
ok "afterok after success" "parent $P end $pend, child $C start $cstart"

# ---------------------------------------------------------------- 4. afterok on failure
F=$("${SB[@]}" --output=/dev/null --wrap 'exit 3')
G=$("${SB[@]}" --dependency=afterok:"$F" --output=never.out --wrap 'echo should not run')
until_ 40 acct_is "$G" CANCELLED || fail "afterok child $G of failed $F: state '$(astate "$G")' reason '$(squeue -h -j "$G" -o %r)'" "$F" "$G"
[ ! -e never.out ] || fail "child of failed job ran" "$G"
fstate=$(sacct -n -X -P -j "$F" -o State,ExitCode)
[ "$fstate" = "FAILED|3:0" ] || fail "failed parent sacct: '$fstate'" "$F"
ok "afterok after failure" "parent $F $fstate; child $G $(astate "$G") (kill_invalid_depend)"

# ---------------------------------------------------------------- 5. scancel a running job
K=$("${SB[@]}" --output=/dev/null --wrap 'sleep 300')
until_ 30 is_running "$K" || fail "job $K never ran" "$K"
scancel "$K"
until_ 20 acct_is "$K" CANCELLED || fail "cancelled job $K: sacct '$(astate "$K")'" "$K"
ok "scancel running job" "job $K sacct -P State: '$(astate "$K")', plain: '$(sacct -j "$K" -n -X -o State | xargs)'"

# ---------------------------------------------------------------- 6. scontrol requeue a running job
R=$("${SB[@]}" --output=requeue.out --wrap 'echo "run ${SLURM_RESTART_COUNT:-0}"; sleep 300')
until_ 30 is_running "$R" || fail "job $R never ran" "$R"
until_ 10 file_has requeue.out 'run 0' || fail "job $R run 0 output" "$R"
t=$(date +%s)
scontrol requeue "$R"
restarted() { is_running "$R" && file_has requeue.out 'run 1'; }
until_ 60 restarted || fail "requeued job $R did not run again" "$R"
dt=$(($(date +%s) - t))
restarts=$(scontrol show job "$R" | grep -o 'Restarts=[0-9]*')
[ "$restarts" = Restarts=1 ] || fail "job $R: $restarts" "$R"
scancel "$R"
until_ 20 acct_is "$R" CANCELLED || fail "requeued+cancelled job $R: '$(astate "$R")'" "$R"
hist=$(sacct -D -n -X -P -j "$R" -o State | tr '\n' ',' | sed 's/,$//')
[[ "$hist" =~ ^REQUEUED,CANCELLED ]] || fail "sacct -D history of $R: $hist" "$R"
ok "scontrol requeue running job" "job $R ran again after ${dt} s, $restarts, sacct -D: $hist"

# ---------------------------------------------------------------- 7. scancel --signal=USR2
S=$("${SB[@]}" --output=sig.out --wrap 'trap "echo got USR2; exit 0" USR2; echo ready; sleep 300 & wait')
until_ 30 is_running "$S" || fail "job $S never ran" "$S"
until_ 10 file_has sig.out ready || fail "job $S not ready" "$S"
scancel --batch --signal=USR2 "$S"
until_ 20 acct_is "$S" COMPLETED || fail "job $S after USR2: '$(astate "$S")' out: $(cat sig.out)" "$S"
file_has sig.out 'got USR2' || fail "job $S did not see USR2" "$S"
ok "scancel --batch --signal=USR2" "job $S trapped USR2, exited 0"

# ---------------------------------------------------------------- 8. --signal near the time limit
until_ 90 acct_is "$BSIG" COMPLETED || fail "--signal=B:USR2@50 job $BSIG: '$(astate "$BSIG")' out: $(cat bsig.out 2>/dev/null)" "$BSIG"
file_has bsig.out 'batch got USR2' || fail "job $BSIG did not see USR2" "$BSIG"
el=$(sacct -n -X -P -j "$BSIG" -o Elapsed)
ok "--time=1 --signal=B:USR2@50" "job $BSIG batch shell got USR2 after $el"

until_ 120 acct_is "$PRE" COMPLETED || fail "preempt job $PRE: '$(astate "$PRE")' out: $(cat preempt.out 2>/dev/null)" "$PRE"
file_has preempt.out 'step got USR2' || fail "preempt job $PRE: step saw no USR2" "$PRE"
file_has preempt.out 'second run done' || fail "preempt job $PRE: no second run" "$PRE"
hist=$(sacct -D -n -X -P -j "$PRE" -o State | tr '\n' ',' | sed 's/,$//')
ok "--signal=USR2@50 -> requeue -> rerun" "job $PRE: step got USR2, requeued itself, reran; sacct -D: $hist"

echo "check.sh took $(($(date +%s) - T0)) s"
echo "check.sh: $PASS passed, 0 failed"
