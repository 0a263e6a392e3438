#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for CI (.ci/slurm-demo.sh runs the demo on it): slurmctld + slurmd on the local host, munge
# authentication, no cgroups (proctrack/linuxproc, task/none), select/cons_tres, partitions
# "cpu" (default) and "gpu" on the same node. Run as root on Debian bookworm (slurm 22.05).
# Idempotent: rerunning it installs nothing new, rewrites the config only when it changed and
# starts only daemons that are not running.
#
#   SLURM_ACCOUNTING=none      (default) no accounting: sacct/sacctmgr do not work; run Snakemake's
#                              slurm executor with `--slurm-status-command squeue` (needs
#                              MinJobAge >= 3 x init_seconds_before_status_checks; 300 s here).
#   SLURM_ACCOUNTING=slurmdbd  also installs mariadb-server + slurmdbd, so sacct works (the
#                              plugin's default status command) and SLURM_ACCOUNTS (default
#                              "your_account") exist for the plugin's account validation.
#   SLURM_FAKE_GPUS=N          declare N fake GPUs (GRES gpu backed by /dev/null clones
#                              /dev/fakegpuI) so sbatch --gpus=K (K <= N) is accepted and jobs get
#                              CUDA_VISIBLE_DEVICES; no CUDA is behind them (torch sees none).
#   SLURM_NODES=N              N slurmd on this host (default 1), nodes HOST-n1..HOST-nN with
#                              their own ports, so jobs can span "nodes" (--nodes 2, srun per node):
#                              the Debian build has MULTIPLE_SLURMD. The names resolve to 127.0.0.1.
#   SLURM_RUN_DIR              pid files (default /run/slurm-ci); logs go to /var/log/slurm.
#
# Measured here (2 cores, gVisor VM, apt lists present, .debs cached): fresh 7-8 s, rerun 0.2-0.5 s,
# SLURM_ACCOUNTING=slurmdbd on top 18 s (mariadb-server + slurmdbd install and start).
#
# Stop: .ci/slurm-down.sh (kills the daemons by the pid files written here).
set -euo pipefail

ACCOUNTING=${SLURM_ACCOUNTING:-none}
FAKE_GPUS=${SLURM_FAKE_GPUS:-0}
NODES=${SLURM_NODES:-1}
ACCOUNTS=${SLURM_ACCOUNTS:-your_account}
RUN_DIR=${SLURM_RUN_DIR:-/run/slurm-ci}
LOG_DIR=/var/log/slurm
CONF_DIR=/etc/slurm
export DEBIAN_FRONTEND=noninteractive

log() { echo "[slurm-up $(date +%T)] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  log "timed out waiting for $what"; return 1
}

# Exit 3: no cluster can be brought up on this machine (not root, no apt, packages unavailable);
# .ci/run reports that as a skip. Every other failure is 1.
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 3; }
command -v apt-get >/dev/null || { echo "no apt-get: this script brings SLURM up on Debian only" >&2; exit 3; }
case "$ACCOUNTING" in none|slurmdbd) ;; *) echo "SLURM_ACCOUNTING must be none or slurmdbd" >&2; exit 1;; esac

# 1. packages -----------------------------------------------------------------------------------
pkgs=(slurmctld slurmd slurm-client munge)
[ "$ACCOUNTING" = slurmdbd ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  if ! { [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq; } ||
     ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    echo "could not install ${missing[*]} with apt-get" >&2
    exit 3
  fi
fi

# 2. munge --------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge   # clients must reach the socket
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged sh -c 'munge -n | unmunge'
fi

# 3. slurm.conf ---------------------------------------------------------------------------------
node=$(hostname -s)
getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
# The SLURM node names: the host itself, or HOST-n1..HOST-nN served by N slurmd on this host.
if [ "$NODES" -gt 1 ]; then
  names=(); for i in $(seq "$NODES"); do names+=("$node-n$i"); done
  for n in "${names[@]}"; do getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts; done
else
  names=("$node")
fi
node_list=$(IFS=,; echo "${names[*]}")
# CPU layout as slurmd sees it; memory a little below the physical total so that slurmd's
# registration never reports less than the configured RealMemory (the node would be drained).
hw=$(slurmd -C | head -1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
boards=$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$hw")
sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
realmem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(( realmem * 95 / 100 ))

gres_line="" gres_types=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  gres_line=" Gres=gpu:$FAKE_GPUS"; gres_types="GresTypes=gpu"
fi

if [ "$ACCOUNTING" = slurmdbd ]; then
  # job_comment: sacct shows each job's comment, where Snakemake's executor names the rule
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$node
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux"
else
  acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" /var/lib/slurm/slurmctld
node_lines=""
for i in "${!names[@]}"; do
  n=${names[$i]}
  mkdir -p "/var/lib/slurm/slurmd-$n"
  # Several slurmd on one host: each its own port; every one sees the whole machine.
  extra=""; [ "$NODES" -gt 1 ] && extra=" NodeHostname=$node NodeAddr=127.0.0.1 Port=$((17001 + i))"
  node_lines+="NodeName=$n$extra CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem$gres_line State=UNKNOWN"$'\n'
done
new_conf=$(cat <<EOF
# written by .ci/slurm-up.sh
ClusterName=ci
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# no cgroups: works in containers and gVisor sandboxes
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
$acct_lines
# finished jobs stay visible to squeue this long; the snakemake slurm plugin only trusts
# 'squeue' as status command when MinJobAge >= 3 x init_seconds_before_status_checks (120 s)
MinJobAge=300
$gres_types
$node_lines
PartitionName=cpu Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$node_list Default=NO MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$new_conf" ]; then
  log "writing $CONF_DIR/slurm.conf"
  printf '%s\n' "$new_conf" > "$CONF_DIR/slurm.conf"
  conf_changed=1
fi
new_gres=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  # slurmd 22.05 drops file-less GPUs ("Removing file-less GPU ... from final GRES list") and
  # drains the node (count reported 0 < N): give each fake GPU a character device of its own.
  for i in $(seq 0 $((FAKE_GPUS - 1))); do [ -c /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done  # = /dev/null
  new_gres="NodeName=$node_list Name=gpu File=/dev/fakegpu[0-$((FAKE_GPUS - 1))]"
fi
if [ "$(cat "$CONF_DIR/gres.conf" 2>/dev/null)" != "$new_gres" ]; then
  if [ -n "$new_gres" ]; then printf '%s\n' "$new_gres" > "$CONF_DIR/gres.conf"; else rm -f "$CONF_DIR/gres.conf"; fi
  conf_changed=1
fi

# 4. accounting (optional) ----------------------------------------------------------------------
if [ "$ACCOUNTING" = slurmdbd ]; then
  if ! mysqladmin ping >/dev/null 2>&1; then
    log "starting mariadb"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (mysqld_safe --pid-file=/run/mysqld/mysqld.pid >/dev/null 2>&1 &)
    wait_for 60 mariadb mysqladmin ping
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-ci';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$node
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-ci
StorageLoc=slurm_acct_db
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  if ! alive "$RUN_DIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
fi

# 5. slurmctld + slurmd -------------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then
  for pidfile in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmctld.pid"; do
    d=$(basename "$pidfile" .pid)
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      log "config changed: stopping $d (pid $pid)"
      kill "$pid"
      wait_for 20 "$d to stop" sh -c "! kill -0 $pid"
    fi
  done
fi
if ! alive "$RUN_DIR/slurmctld.pid"; then log "starting slurmctld"; slurmctld; fi
wait_for 30 slurmctld scontrol ping
if [ "$ACCOUNTING" = slurmdbd ]; then
  sacctmgr -i -Q add cluster ci >/dev/null 2>&1 || true
  for a in ${ACCOUNTS//,/ }; do
    sacctmgr -n list account "$a" format=account%64 | grep -qw "$a" || sacctmgr -i -Q add account "$a" cluster=ci
    sacctmgr -i -Q add user root account="$a" cluster=ci >/dev/null 2>&1 || true
  done
fi
for n in "${names[@]}"; do
  if ! alive "$RUN_DIR/slurmd-$n.pid"; then log "starting slurmd for $n"; slurmd -N "$n"; fi
done
# a node left down/drained by an earlier run comes back
for n in "${names[@]}"; do
  wait_for 30 "node $n to register" sh -c "sinfo -h -n $n -o %t | grep -qvE 'unk|down'" || true
  case "$(sinfo -h -n "$n" -o %t | head -1)" in down*|drain*|drng*|inval*) scontrol update nodename="$n" state=resume || true;; esac
  wait_for 30 "node $n to be idle" sh -c "sinfo -h -n $n -o %t | grep -qE '^(idle|mix|alloc)'"
done

# 6. smoke test ---------------------------------------------------------------------------------
out=$(srun -p cpu -N"$NODES" -n"$NODES" -t 1 printenv SLURMD_NODENAME | sort | paste -sd,)
[ "$out" = "$node_list" ] || { log "smoke test failed: srun printed '$out', expected '$node_list'"; exit 1; }
log "ready: $(sinfo -h -o '%P %a %D %t %c cpus %m MB' | tr '\n' ';') nodes=$node_list accounting=$ACCOUNTING fake_gpus=$FAKE_GPUS"
