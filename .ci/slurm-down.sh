#!/usr/bin/env bash
# Stop the cluster of .ci/slurm-up.sh: cancel its jobs, then each daemon by its PID file.
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
scancel --user="$(id -un)" 2>/dev/null || true
sleep 1
stop() {
  [ -s "$1" ] || return 0
  local p; p=$(cat "$1")
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
}
stop "$D/slurmd.pid"; stop "$D/slurmctld.pid"; stop "$D/slurmdbd.pid"; stop "$D/mariadb.pid"
stop /run/munge/munged.pid
rm -f "$D/mariadb.pid"
echo "[slurm-down] stopped"
