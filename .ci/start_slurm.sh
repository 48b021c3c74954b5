#!/usr/bin/env bash
# Start a single-node Slurm on 127.0.0.1 (munge, slurmctld, slurmd) for emlab's Slurm tests.
#
#   .ci/start_slurm.sh            install Debian's packages if missing (root + apt-get), configure, start, wait
#   .ci/start_slurm.sh --no-install   only configure and start what is installed (what the tests do)
#   .ci/start_slurm.sh --stop     stop the daemons this script started (by their pid files)
#
# Idempotent: when `sinfo` already shows the node idle it changes nothing. Every wait has a limit
# (EMLAB_SLURM_WAIT seconds, default 60). No cgroups, no accounting database: ProctrackType=linuxproc,
# TaskPlugin=task/none, select/cons_tres on one node "localhost" with this machine's CPUs and memory.
# An existing slurm.conf that this script did not write (a real cluster's) is left alone: it stops.
# Exits 0 when the node is idle (or mixed/allocated: usable), 1 with the reason otherwise.
set -uo pipefail

WAIT=${EMLAB_SLURM_WAIT:-60}
CONF_DIR=/etc/slurm
STATE=/var/lib/emlab-slurm
LOGS=/var/log/emlab-slurm
RUN=/run/emlab-slurm
install=1
case "${1:-}" in
  --no-install) install=0 ;;
  --stop)
    for d in slurmd slurmctld; do
      if [ -f "$RUN/$d.pid" ]; then kill "$(cat "$RUN/$d.pid")" 2>/dev/null && echo "[slurm] stopped $d"; fi
    done
    if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null && echo "[slurm] stopped munged"; fi
    exit 0
    ;;
  "") ;;
  *) echo "usage: $0 [--no-install | --stop]" >&2; exit 2 ;;
esac

say() { echo "[slurm] $*"; }
fail() { echo "[slurm] cannot start Slurm: $*" >&2; exit 1; }

node_state() {  # the node's state as sinfo reports it (idle, mixed, alloc, down*, drain, ...), or nothing
  timeout 10 sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n 1
}
usable() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

if command -v sinfo >/dev/null 2>&1 && usable; then
  say "already running: node localhost is $(node_state)"
  exit 0
fi

# --- packages -------------------------------------------------------------------------------
missing=()
for bin in munged slurmctld slurmd sinfo sbatch; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$install" = 1 ] || fail "not installed (${missing[*]}); run .ci/start_slurm.sh (as root) to install Debian's munge, slurmctld, slurmd, slurm-client"
  [ "$(id -u)" = 0 ] || fail "not installed (${missing[*]}) and not root: cannot apt-get install"
  command -v apt-get >/dev/null 2>&1 || fail "not installed (${missing[*]}) and no apt-get"
  say "installing munge slurmctld slurmd slurm-client (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying the install anyway"
  timeout 600 apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null \
    || fail "apt-get install munge slurmctld slurmd slurm-client failed"
fi
[ "$(id -u)" = 0 ] || fail "starting munged, slurmctld and slurmd needs root"

# --- munge ----------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null 2>&1 || true; fi
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge; chmod 0400 /etc/munge/munge.key
if ! timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
  say "starting munged"
  if id munge >/dev/null 2>&1; then
    timeout 20 runuser -u munge -- /usr/sbin/munged || timeout 20 /usr/sbin/munged --force || fail "munged did not start"
  else
    timeout 20 /usr/sbin/munged --force || fail "munged did not start"
  fi
  for _ in $(seq 1 20); do
    timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
    sleep 0.5
  done
  timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 || fail "munge does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf -----------------------------------------------------------------------------
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
conf="$CONF_DIR/slurm.conf"
new=$(mktemp)
cat >"$new" <<EOF
# Written by emlab's .ci/start_slurm.sh: a single-node Slurm on 127.0.0.1 for tests.
ClusterName=emlab
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
MaxArraySize=10001
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if [ -f "$conf" ] && ! grep -q "emlab's .ci/start_slurm.sh" "$conf" && [ "${EMLAB_SLURM_FORCE:-0}" != 1 ]; then
  rm -f "$new"
  fail "$conf exists and was not written by this script (a real cluster's?): not touching it (EMLAB_SLURM_FORCE=1 overrides, keeping a copy)"
fi
if ! cmp -s "$new" "$conf"; then
  [ -f "$conf" ] && ! grep -q "emlab's .ci/start_slurm.sh" "$conf" && cp "$conf" "$conf.before-emlab"
  mv "$new" "$conf"; chmod 0644 "$conf"
  say "wrote $conf (CPUs=$cpus, RealMemory=${mem_mb} MB)"
  restart=1
else
  rm -f "$new"; restart=0
fi

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
for d in slurmctld slurmd; do
  if alive "$d" && [ "$restart" = 1 ]; then kill "$(cat "$RUN/$d.pid")" 2>/dev/null; sleep 1; fi
done
if ! alive slurmctld; then
  say "starting slurmctld"
  timeout 30 slurmctld -c >/dev/null 2>&1 || timeout 30 slurmctld >/dev/null 2>&1 \
    || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! alive slurmd; then
  say "starting slurmd"
  timeout 30 slurmd -N localhost >/dev/null 2>&1 || fail "slurmd did not start (see $LOGS/slurmd.log)"
fi

# --- wait for the node ----------------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  state=$(node_state)
  case "$state" in
    idle|mixed|allocated|completing) say "node localhost is $state (partition debug)"; exit 0 ;;
    down*|drain*|drained*|fail*)
      timeout 10 scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
fail "node localhost not idle after ${WAIT}s (state: '$(node_state)'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
