"""A throw-away single-node SLURM cluster on localhost for tests: munged + slurmctld + slurmd (Debian).

``start_cluster(state_dir)`` installs ``slurmctld slurmd slurm-client munge`` with apt-get when they are
missing (root only), writes a ``slurm.conf`` (no cgroups, no systemd, no slurmdbd; two partitions: ``debug``,
preemptible with REQUEUE, and ``urgent``, which preempts it), starts the daemons and returns a ``Cluster``
whose ``env`` has ``SLURM_CONF`` set. ``Cluster.stop()`` cancels jobs and stops the daemons by their pidfiles.
``SlurmUnavailable`` says why a cluster cannot be had (not root, no apt-get, install failed): tests skip
with that reason. The recipe follows Debian bookworm's slurm-wlm 22.05.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
CRED_EXPIRE = 10
"""Seconds a requeued job waits before it may start again (SLURM's default, 120, slows tests down)."""


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message is the reason to skip."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def ensure_installed() -> None:
    """Install the Debian packages if a binary is missing; ``SlurmUnavailable`` when that is impossible."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        *PACKAGES,
    ]
    proc = _run(install, env=env, timeout=900)
    if proc.returncode != 0:
        _run(["apt-get", "update"], env=env, timeout=900)
        proc = _run(install, env=env, timeout=900)
    if proc.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        raise SlurmUnavailable(
            f"apt-get could not install {' '.join(PACKAGES)}: {proc.stderr.strip()[-500:]}"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # some container inits never reap: a zombie is dead
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SlurmUnavailable(f"timed out waiting for {what}")


@dataclass
class Cluster:
    root: Path
    node: str

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def cmd(self, *args: str, check: bool = True) -> str:
        proc = _run(list(args), env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        out = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.is_file():
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their pidfiles (never by name)."""
        if (self.root / "slurmctld.pid").is_file():
            # a job being requeued refuses scancel for a moment and may start again: repeat until none is left
            deadline = time.time() + 60
            while time.time() < deadline:
                jobs = _run(["squeue", "-h", "-o", "%i"], env=self.env, timeout=30).stdout.split()
                if not jobs:
                    break
                _run(["scancel", *jobs], env=self.env, timeout=30)
                time.sleep(1)
        for pidfile, name in (
            ("slurmd.pid", "slurmd"),
            ("slurmctld.pid", "slurmctld"),
            ("munge/munged.pid", "munged"),
        ):
            path = self.root / pidfile
            if not path.is_file():
                continue
            try:
                pid = int(path.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except (ValueError, OSError):
                path.unlink(missing_ok=True)
                continue
            if _alive(pid) and name in cmdline:
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + 10
                while time.time() < deadline and _alive(pid):
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)


_DEBUG_PREEMPT = "PreemptMode=REQUEUE GraceTime=10"
"""Jobs in ``debug`` are requeued when ``urgent`` needs their CPUs, after 10 s to save."""


def _slurm_conf(root: Path, node: str, node_line: str, socket_path: Path) -> str:
    return f"""ClusterName=locfttest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug  Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 {_DEBUG_PREEMPT}
PartitionName=urgent Nodes=ALL Default=NO  MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_cluster(root: Path) -> Cluster:
    """Install if needed and start a fresh cluster with all state under ``root`` (an absolute path)."""
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs its daemons as root (SlurmUser=root); not root here")
    for port in (6817, 6818):
        if not _port_free(port):
            raise SlurmUnavailable(f"port {port} is taken (another slurmctld/slurmd on this machine?)")
    root = root.resolve()
    for sub in ("etc", "state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o755)  # munged wants its socket directory a+x
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(root, node)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    try:
        if not key.is_file():
            _run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        # --force: tolerate a state directory under a non-root-owned parent (a CI workspace)
        munged = [
            "munged",
            f"--key-file={key}",
            f"--socket={sock}",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/munge/munged.log",
            f"--seed-file={root}/munge/munged.seed",
            "--num-threads=2",
            "--force",
        ]
        if _run(munged).returncode != 0:
            raise SlurmUnavailable(f"munged did not start\n{cluster.logs()}")
        _wait(sock.exists, 10, "the munge socket")
        node_line = _run(["slurmd", "-C"]).stdout.splitlines()[0]  # NodeName=.. CPUs=.. RealMemory=..
        cluster.conf.write_text(_slurm_conf(root, node, node_line, sock))
        if _run(["slurmctld", "-f", str(cluster.conf)], env=cluster.env).returncode != 0:
            raise SlurmUnavailable(f"slurmctld did not start\n{cluster.logs()}")
        _wait(lambda: "is UP" in cluster.cmd("scontrol", "ping", check=False), 20, "slurmctld")
        if _run(["slurmd", "-f", str(cluster.conf)], env=cluster.env).returncode != 0:
            raise SlurmUnavailable(f"slurmd did not start\n{cluster.logs()}")
        _wait(
            lambda: (
                cluster.cmd("sinfo", "-h", "-N", "-p", "debug", "-o", "%T", check=False).strip() == "idle"
            ),
            60,
            "the node to become idle",
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
