#!/usr/bin/env bash
# Stops the daemons .ci/slurm-up.sh started, by the pid files it wrote (slurmd, slurmctld,
# slurmdbd; munged and mariadb by their own pid files). Leaves packages and config in place.
set -u
RUN_DIR=${SLURM_RUN_DIR:-/run/slurm-ci}
stop() { # stop NAME PIDFILE
  [ -s "$2" ] || return 0
  local pid; pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    echo "stopping $1 (pid $pid)"; kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { echo "$1 still running, SIGKILL"; kill -9 "$pid"; }
  fi
  return 0
}
for pidfile in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid; do stop "$(basename "$pidfile" .pid)" "$pidfile"; done
stop slurmctld "$RUN_DIR/slurmctld.pid"
stop slurmdbd "$RUN_DIR/slurmdbd.pid"
[ "${STOP_MUNGE:-1}" = 1 ] && stop munged /run/munge/munged.pid
[ "${STOP_MARIADB:-1}" = 1 ] && stop mariadb /run/mysqld/mysqld.pid
exit 0
