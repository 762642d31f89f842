"""A throwaway one-node SLURM cluster on loopback, for the launch tests.

Debian's ``slurmctld``, ``slurmd`` and ``munged`` are started as root with a
private config, munge key and spool dirs under one temporary directory, on free
ports, so they neither need nor touch ``/etc/slurm`` or a system munge. Clients
(``sbatch``, ``scontrol``, ...) find the cluster through ``SLURM_CONF``, which
:meth:`LocalSlurm.env` sets; jobs inherit it because sbatch exports the
submitting environment.

No accounting daemon: job state is read from ``scontrol show job``, which keeps
finished jobs for ``MinJobAge`` seconds (set high here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> dict[str, str]:
    """This machine's node line as slurmd sees it (so the node is not drained for a mismatch)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split())


@dataclass
class JobInfo:
    job_id: int
    state: str
    exit_code: str
    restarts: int
    fields: dict[str, str]


class LocalSlurm:
    """Start/stop munged + slurmctld + slurmd for a single node called ``localhost``."""

    NODE = "localhost"
    PARTITION = "debug"

    def __init__(self, root: Path | None = None):
        # Not under pytest's tmp_path: munged insists every directory above its socket is
        # world-executable, and pytest's /tmp/pytest-of-root is 0700. Keep the path short too
        # (unix socket paths are limited to ~108 bytes).
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="lcv-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self._procs: dict[str, subprocess.Popen] = {}
        self.cpus = 0  # the node's CPU count, known once started

    # -- environment ---------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        # A stray SLURM_* from an enclosing allocation would confuse sbatch/srun.
        for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[k]
        return env

    def _run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    # -- lifecycle -----------------------------------------------------------
    def _write_config(self) -> None:
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(mode=0o755, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        hw = _hardware()
        self.cpus = int(hw["CPUs"])
        cpus = hw["CPUs"]
        topo = " ".join(f"{k}={hw[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket",
                                                   "ThreadsPerCore") if k in hw)
        mem = min(int(hw.get("RealMemory", "1024")), 4096)
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/launch/slurm_cluster.py; one node, everything under {r}.
ClusterName=lcvtest
SlurmctldHost={self.NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers/gVisor: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start a requeued job as soon as it is eligible again (the default backfill pass is every 30 s).
SchedulerParameters=bf_interval=1
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol (there is no accounting daemon).
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.NODE} NodeHostname={self.NODE} NodeAddr=127.0.0.1 CPUs={cpus} {topo} RealMemory={mem} State=UNKNOWN
PartitionName={self.PARTITION} Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self._procs[name] = subprocess.Popen([_which(name), *args], env=self.env(), stdout=log,
                                             stderr=subprocess.STDOUT, cwd=self.root,
                                             start_new_session=True)

    def _wait_for(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ok():
                return
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs())

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", "-F", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
                    f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}")
        self._wait_for("munged", self.munge_socket.exists, timeout)
        self._spawn("slurmctld", "-D", "-c", "-i", "-f", str(self.conf))
        self._wait_for("slurmctld", lambda: self._run("scontrol", "ping", check=False).returncode == 0,
                       timeout)
        self._spawn("slurmd", "-D", "-N", self.NODE, "-f", str(self.conf))
        self._wait_for("node idle", lambda: self.node_state() == "idle", timeout)
        return self

    def node_state(self) -> str:
        r = self._run("sinfo", "-h", "-n", self.NODE, "-o", "%T", check=False)
        return r.stdout.strip()

    def stop(self) -> None:
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run("scancel", "--full", "-u", "root", check=False)
        # Reverse start order: slurmd (and its slurmstepd children) first, munged last.
        for name in reversed(list(self._procs)):
            p = self._procs[name]
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
        self._procs.clear()

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- jobs ----------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(env),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> JobInfo:
        out = self._run("scontrol", "-o", "show", "job", str(job_id)).stdout.strip()
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))
        return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?"),
                       int(fields.get("Restarts", "0")), fields)

    def wait(self, job_id: int, timeout: float, poll: float = 0.5) -> JobInfo:
        """Wait until the job reaches a final state and return it."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.state in final:
                return info
            if time.monotonic() > deadline:
                self._run("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info.state} after {timeout:.0f}s\n{self.logs()}")
            time.sleep(poll)

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> JobInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.state in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {info.state}, not in {states} after {timeout:.0f}s")
            time.sleep(0.25)
