#!/usr/bin/env bash
# Bring up a throw-away single-node Slurm cluster (Debian 12 / Slurm 22.05) for the tests
# marked `slurm`: munge, MariaDB + slurmdbd (submitit reads job states with sacct; without
# it a job that dies without a result hangs the Hydra multirun), slurmctld and slurmd.
# Run as root on a machine without systemd; stop it with .ci/slurm-down.sh (by PID).
#   SLURM_CI_DIR   state, logs and PID files (default /tmp/slurm-ci; wiped first)
#   SLURM_CI_CPUS  CPUs to advertise (default: nproc); more than nproc oversubscribes
set -euo pipefail
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)

# Fresh state (stopping an earlier cluster of this script first): job ids restart at 1,
# so old state or accounting rows would confuse sacct.
[ -d "$D" ] && "$(dirname "$0")/slurm-down.sh" >/dev/null
rm -rf "$D"
mkdir -p "$D"/{state,spool,log}
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
# A fresh machine may have no package lists yet.
dpkg -s $PKGS >/dev/null 2>&1 || apt-get update -q >"$D/apt.log" 2>&1 || { tail -30 "$D/apt.log"; exit 1; }
# --no-install-recommends: 8 + 20 packages instead of ~60 (ROCm SMI, HDF5, InfluxDB, ...).
apt-get install -y -q --no-install-recommends $PKGS >>"$D/apt.log" 2>&1 || { tail -30 "$D/apt.log"; exit 1; }
echo "[slurm-up] apt install: $(( $(date +%s) - t0 ))s"

H=$(hostname -s)
getent hosts "$H" >/dev/null || echo "127.0.0.1 $H" >>/etc/hosts   # SlurmctldHost must resolve
CPUS=${SLURM_CI_CPUS:-$(nproc)}
OVR=""; [ "$CPUS" -gt "$(nproc)" ] && OVR="SlurmdParameters=config_overrides"
# More RealMemory than slurmd -C reports drains the node.
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')

cat >/etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
$OVR
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire+1 s before it may start again (default 121 s)
AuthInfo=cred_expire=10
MpiDefault=none
# no cgroups: nothing to configure, nothing to fail in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# submitit ignores SIGTERM: a cancelled or requeued task lingers KillWait s (default 30) before SIGKILL
KillWait=5
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
NodeName=$H CPUs=$CPUS RealMemory=$((MEM - 1024)) State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses to start otherwise

# munge: Debian's postinst created the key; munged refuses to run as root.
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged   # forks; PID in /run/munge/munged.pid
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

install -d -o mysql -g root -m 0755 /run/mysqld
nohup /usr/sbin/mariadbd --user=mysql >"$D/log/mariadb.log" 2>&1 &
echo $! >"$D/mariadb.pid"
for _ in $(seq 100); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
# Rows of an earlier cluster with the same (restarted) job ids would make sacct lie.
mariadb -e 'DROP DATABASE IF EXISTS slurm_acct_db'
slurmdbd   # root reaches MariaDB over the unix socket, no password
for _ in $(seq 100); do sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 0.2; done

slurmctld   # daemonizes and registers the cluster in slurmdbd
slurmd
for _ in $(seq 120); do
  [ "$(sinfo -h -n "$H" -o %T 2>/dev/null | head -1)" = idle ] && break; sleep 0.5
done
[ "$(sinfo -h -n "$H" -o %T | head -1)" = idle ] || { sinfo; tail -20 "$D"/log/*.log; exit 1; }
echo "[slurm-up] cluster up ($H, $CPUS CPUs, partition debug): $(( $(date +%s) - t0 ))s"
