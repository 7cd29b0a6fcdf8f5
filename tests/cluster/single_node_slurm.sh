#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/test_slurm.py and CI.
#
#   tests/cluster/single_node_slurm.sh install install Debian's slurmctld, slurmd, slurm-client, munge (apt)
#   tests/cluster/single_node_slurm.sh start   install (if missing), configure, start, wait for the node
#   tests/cluster/single_node_slurm.sh stop    stop the daemons this script started, by their PID files
#
# Debian 12 (slurm-wlm 22.05, munge 0.5), root, no systemd: the daemons are started by hand. The node
# advertises two fake GPUs (GRES gpu:fake:2) backed by character devices, so that GPU requests are
# scheduled for real. There is no accounting database: `sacct` fails, so the Snakemake executor plugin
# must poll with squeue (`slurm-status-command: squeue`, in workflow/profiles/slurm), and finished jobs
# stay visible to squeue for MinJobAge seconds. Idempotent: `start` again only starts what is not running.
set -euo pipefail

FAKE_GPUS=2
PARTITION=debug
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
NODE="$(hostname -s)"

log() { echo "[single_node_slurm] $*"; }
pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop one daemon by its PID file; SIGKILL if it has not exited after 10 s
  local pidfile=$1 pid
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  log "stopping $(basename "$pidfile" .pid) (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_pidfile "$RUN_DIR/slurmd.pid"
  stop_pidfile "$RUN_DIR/slurmctld.pid"
  stop_pidfile /run/munge/munged.pid
}

install_packages() {
  local missing=() package
  for package in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  (( ${#missing[@]} )) || return 0
  log "installing ${missing[*]}"
  # Without systemd the packages' postinst cannot start services ("policy-rc.d denied"): harmless.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
  [[ -s /etc/munge/munge.key ]] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  pid_alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 40); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "munge does not work: munge -n | unmunge fails" >&2
  return 1
}

write_config() {  # prints "changed" when slurm.conf or gres.conf changed
  local cpus memory before
  cpus=$(nproc)
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  memory=$(( memory > 2048 ? memory - 1024 : memory ))  # leave 1 GiB to the system
  before=$(cat "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf" 2>/dev/null || true)
  install -d -m 0755 "$CONF_DIR" /var/spool/slurmd
  install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOG_DIR" "$RUN_DIR"
  # No cgroups without systemd: linuxproc process tracking, no task plugin.
  cat > "$CONF_DIR/slurm.conf" <<CONF
# written by tests/cluster/single_node_slurm.sh
ClusterName=pathmamba-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue forgets finished jobs after MinJobAge s; the plugin's squeue polling needs them for minutes.
MinJobAge=600
GresTypes=gpu
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} Gres=gpu:fake:${FAKE_GPUS} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
# Two more partitions on the same node, with time limits: the config's slurm.gpu_partition and
# slurm.cpu_partition send jobs to them, and doctor reads their limits.
PartitionName=gpu Nodes=${NODE} MaxTime=1-00:00:00 State=UP
PartitionName=cpu Nodes=${NODE} MaxTime=04:00:00 State=UP
CONF
  # slurmd drops a GPU GRES without File= and the node goes INVAL, so every fake GPU gets a character
  # device with /dev/null's numbers. /dev is recreated at boot: make them on every start.
  for ((gpu = 0; gpu < FAKE_GPUS; gpu++)); do
    [[ -e /dev/fakegpu$gpu ]] || mknod -m 0666 "/dev/fakegpu$gpu" c 1 3
  done
  printf 'AutoDetect=off\nNodeName=%s Name=gpu Type=fake File=/dev/fakegpu[0-%d]\n' \
    "$NODE" "$(( FAKE_GPUS - 1 ))" > "$CONF_DIR/gres.conf"
  chmod 0644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
  [[ "$before" == "$(cat "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf")" ]] || echo changed
}

wait_for_node() {
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mixed|allocated) return 0 ;;
      *drain*|*down*|inval*|*fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "node $NODE is not ready: state '$state'" >&2
  scontrol show node "$NODE" >&2 || true
  tail -20 "$LOG_DIR/slurmd.log" >&2 || true
  return 1
}

start() {
  [[ $(id -u) -eq 0 ]] || { echo "must run as root (installs packages, starts daemons)" >&2; exit 1; }
  install_packages
  # slurmd must resolve its own node name.
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts
  start_munge
  if [[ "$(write_config)" == changed ]]; then
    log "configuration changed: restarting the SLURM daemons"
    stop_pidfile "$RUN_DIR/slurmd.pid"
    stop_pidfile "$RUN_DIR/slurmctld.pid"
  fi
  pid_alive "$RUN_DIR/slurmctld.pid" || /usr/sbin/slurmctld -i  # -i: ignore stale saved state
  for _ in $(seq 1 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.25; done
  pid_alive "$RUN_DIR/slurmd.pid" || /usr/sbin/slurmd
  wait_for_node
  timeout -k 5 60 srun -N1 -n1 -t 1 true
  log "ready: node $NODE, partitions $PARTITION (default), gpu, cpu; GPUs gpu:fake:$FAKE_GPUS"
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
