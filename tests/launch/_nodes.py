"""Two emulated nodes on this machine: two ``launch/torchrun.sh`` lines with ``LCV_NNODES=2``, as on two hosts."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ._support import REPO, TINY, TORCHRUN_SH, launch_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``launch/torchrun.sh`` line in its own session (so the whole node can be killed at once)."""

    def __init__(self, name: str, tmp: Path, endpoint: str, args: list[str], **env: str):
        self.name, self.log_path = name, tmp / f"node{name}.log"
        self.log_path.touch()
        self.env = launch_env(LCV_NNODES="2", LCV_RDZV_ENDPOINT=endpoint, LCV_RUN_NAME="mn", LCV_NO_PROGRESS="1",
                              **env)
        self.args, self.cwd = args, tmp
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([str(TORCHRUN_SH), *self.args], cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def workers(self) -> list[psutil.Process]:
        out = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "lcv_train" in " ".join(child.cmdline()) and "RANK" in child.environ():
                    out.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def kill(self) -> None:
        """The node is lost: every process of it, at once (SIGKILL: no cleanup, no goodbye)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # the agent runs each worker in a session of its own: collect them first
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)


def start_store(tmp: Path) -> tuple[subprocess.Popen, str]:
    """``launch/rdzv_store.py`` on a free port: the rendezvous store outside both nodes."""
    port = free_port()
    log = open(tmp / "store.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "rdzv_store.py"), f"127.0.0.1:{port}"],
                            env=launch_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "serving" not in (tmp / "store.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "store.log").read_text()
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


def train_args(tmp: Path, *overrides: str) -> list[str]:
    return [f"run.root={tmp / 'outputs'}", *TINY, *overrides]


STEP_LINE = re.compile(r"step (\d+) loss (\S+) grad_norm (\S+)")


def steps_logged(rank_log: Path) -> list[tuple[int, str]]:
    """(step, "loss grad_norm") for every step line of a rank's log, in order (all attempts)."""
    if not rank_log.exists():
        return []
    return [(int(m[1]), f"{m[2]} {m[3]}") for m in STEP_LINE.finditer(rank_log.read_text())]


def wait_for_step(rank_log: Path, step: int, nodes: list[Node], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _ in steps_logged(rank_log)):
        for n in nodes:
            assert n.proc.poll() is None, f"node {n.name} exited {n.proc.returncode}\n{n.log()[-4000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached\n" + "\n".join(n.log()[-3000:] for n in nodes)
        time.sleep(0.2)


def start_mismatched_nodes(tmp: Path) -> tuple[Node, Node]:
    """Two one-rank nodes of one job whose configs differ in one key (node B: ``optim.lr=5e-4``)."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = train_args(tmp, "trainer.max_steps=3")
    a = Node("A", tmp, endpoint, args, LCV_NPROC_PER_NODE="1")
    b = Node("B", tmp, endpoint, [*args, "optim.lr=5e-4"], LCV_NPROC_PER_NODE="1")
    return a, b
