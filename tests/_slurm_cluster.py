"""A real Slurm cluster for the tests, from Debian's packages (slurmctld, slurmd, slurm-client, munge): one
controller and two slurmd daemons on this machine, so a 2-node job is a real 2-node job.

Everything lives in a fresh temporary folder (config, munge key and socket, state, spool, logs, pid files); the
controller and the two nodes listen on free ports picked at start-up, never Slurm's defaults, so two runs (or a
system Slurm) cannot meet. PID 1 may not be systemd, so the daemons are started by hand: munged, slurmctld, then one
`slurmd -N <node>` per node (Debian's slurmd accepts several per host when each node has its own port). The nodes
declare more CPUs than the machine has (`SlurmdParameters=config_overrides`), so the tests' jobs can run side by side.

`stop()` cancels every job, shuts the cluster down and then kills, by pid, every process it started that is still
there: it runs even when start-up failed half way.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

PACKAGES = "slurmctld slurmd slurm-client munge"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODES = ("wbn1", "wbn2")
CPUS_PER_NODE = 4
CRED_EXPIRE = 10  # seconds


class ClusterError(RuntimeError):
    pass


def missing_reason() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH): apt-get install -y "
                f"--no-install-recommends {PACKAGES} (.ci/run does it)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run the Slurm tests as root (CI does)"
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on now (bound then released; Slurm binds them a moment later)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SlurmCluster:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="wb-slurm-")  # short: the munge socket path must fit in 108 bytes
        self.conf = os.path.join(self.root, "slurm.conf")
        self.name = "wb" + uuid.uuid4().hex[:8]
        self.host = socket.gethostname().split(".")[0]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = self.conf
        self.pid_files: list[str] = []

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> "SlurmCluster":
        why = missing_reason()
        if why:
            raise ClusterError(why)
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o711)
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = os.path.join(r, "munge", "sock")
        munge_pid = os.path.join(r, "munge", "munged.pid")
        self.pid_files.append(munge_pid)
        self._run(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={munge_pid}", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"])
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.ports = [ctld_port, *node_ports]
        with open(self.conf, "w") as f:
            f.write(self._config(ctld_port, node_ports))
        self.pid_files.append(os.path.join(r, "slurmctld.pid"))
        self._run(["slurmctld", "-f", self.conf])
        for node in NODES:
            self.pid_files.append(os.path.join(r, f"slurmd.{node}.pid"))
            self._run(["slurmd", "-f", self.conf, "-N", node])
        self._wait_idle(timeout=60)
        return self

    def _config(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} "
                          f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        return f"""# Written by the tests' Slurm fixture: a throw-away cluster, everything under {r}
ClusterName={self.name}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits (Slurm 22.05's default: 120 s); releasing it earlier by hand
# races with the node still refusing the old run's revoked credential ("Job credential revoked", seen).
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
# No cgroups here (PID 1 is not systemd): processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,sched_min_interval=200000
KillWait=5
MinJobAge=300
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline, out = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                                  text=True)
            out = proc.stdout + proc.stderr
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise ClusterError(f"the nodes did not come up idle in {timeout:.0f} s (sinfo: {out.strip()})\n{self.logs()}")

    # ----------------------------------------------------------------------------------------------- helpers
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300) -> dict:
        """Wait for a job to reach one of `states` (a requeued job waits CRED_EXPIRE seconds before it restarts)."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise ClusterError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after {timeout:.0f} s"
                           f"\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        log_dir = os.path.join(self.root, "log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
            out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------------------------------------- stop
    def _pids(self, files: list[str] | None = None) -> list[int]:
        pids = []
        for path in self.pid_files if files is None else files:
            try:
                with open(path) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return [p for p in pids if _alive(p)]

    def stop(self) -> None:
        """Cancel the jobs, shut down, kill what is left by pid, remove the folder. Never raises."""
        try:
            if os.path.exists(self.conf) and os.path.exists(os.path.join(self.root, "slurmctld.pid")):
                subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    q = subprocess.run(["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING"], env=self.env,
                                       capture_output=True, text=True, timeout=30)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
                subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 10  # the Slurm daemons stop on `scontrol shutdown`; munged is stopped below
        while set(self._pids()) - set(self._pids(self.pid_files[:1])) and time.monotonic() < deadline:
            time.sleep(0.3)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self._pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        self.left_over = self._pids()
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
