"""Losing a node: how long two emulated nodes take to notice a fault and to recover from it.

Two ``launch/torchrun.sh`` lines on this machine (``LCV_NNODES=2``, one gloo rank each, the tiny model),
the rendezvous store outside both (``launch/rdzv_store.py``). Measured, each once:

- config mismatch: node B with another ``optim.lr``; seconds from the launch until both nodes exit 2;
- frozen rank: ``SIGSTOP`` of node B's worker with ``trainer.collective_timeout_s=10``; seconds until
  node A's job ends with the step and phase line;
- lost node B, then lost node A (``kill -9`` of agent and worker): seconds until the survivor's workers
  are gone (detect), and from restarting the lost node's line to the first new step (recover).

    python bench/multinode.py [--no-record]      # prints a table, appends it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.launch._nodes import Node, free_port, start_mismatched_nodes, start_store, steps_logged, train_args, wait_for_step  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"


def mismatch(tmp: Path) -> float:
    t0 = time.monotonic()
    a, b = start_mismatched_nodes(tmp)
    try:
        assert (a.wait(300), b.wait(300)) == (2, 2), a.log()[-2000:] + b.log()[-2000:]
    finally:
        a.kill(), b.kill()
    return time.monotonic() - t0


def frozen(tmp: Path) -> tuple[float, str]:
    endpoint = f"127.0.0.1:{free_port()}"
    args = train_args(tmp, "trainer.max_steps=400", "trainer.collective_timeout_s=10")
    a = Node("A", tmp, endpoint, args, LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="0")
    b = Node("B", tmp, endpoint, args, LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="0")
    try:
        wait_for_step(tmp / "outputs" / "mn" / "logs" / "rank0.log", 4, [a, b])
        b.workers()[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        a.wait(300)
        took = time.monotonic() - t0
    finally:
        a.kill(), b.kill()
    line = next(x for x in a.log().splitlines() if x.startswith("lcv-train: error: step "))
    return took, line.split(" on rank", 1)[0].removeprefix("lcv-train: error: ")


def lost_nodes(tmp: Path) -> list[tuple[str, float, float]]:
    store, endpoint = start_store(tmp)
    args = train_args(tmp, "trainer.max_steps=60", "trainer.checkpoint_every=4")
    env = dict(LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="2", LCV_RDZV_IS_HOST="0")
    a, b = Node("A", tmp, endpoint, args, **env), Node("B", tmp, endpoint, args, **env)
    rank0 = tmp / "outputs" / "mn" / "logs" / "rank0.log"
    out = []
    try:
        for victim, survivor, at in ((b, a, 6), (a, b, 24)):
            wait_for_step(rank0, at, [a, b])
            before = len(steps_logged(rank0))
            t0 = time.monotonic()
            victim.kill()
            while survivor.workers():
                time.sleep(0.05)
            detect = time.monotonic() - t0
            t1 = time.monotonic()
            victim.start()
            while len(steps_logged(rank0)) <= before:
                time.sleep(0.1)
            out.append((victim.name, detect, time.monotonic() - t1))
        assert (a.wait(400), b.wait(400)) == (0, 0)
    finally:
        a.kill(), b.kill()
        store.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(("config mismatch (node B: optim.lr=5e-4)", f"both nodes exit 2 after {mismatch(Path(d)):.1f} s "
                     "(start-up included)", "-"))
    with tempfile.TemporaryDirectory() as d:
        took, what = frozen(Path(d))
        rows.append(("frozen rank (SIGSTOP), collective_timeout_s=10", f"job ends {took:.1f} s later: `{what}`", "-"))
    with tempfile.TemporaryDirectory() as d:
        for name, detect, recover in lost_nodes(Path(d)):
            rows.append((f"node {name} lost (kill -9), external store", f"survivor's workers gone after {detect:.1f} s",
                         f"first new step {recover:.1f} s after restarting node {name}"))
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    head = (f"{platform.processor() or platform.machine()}, {datetime.date.today()}, load average {load} at the end")
    table = ["| fault | detected | recovered |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    print(head), print("\n".join(table))
    if not opts.no_record:
        text = RESULTS.read_text()
        section = "## Losing a node"
        entry = f"\nRun: {head}.\n\n" + "\n".join(table) + "\n"
        if section not in text:
            text = (text.rstrip("\n") + f"\n\n{section}\n\n`bench/multinode.py`: two emulated nodes (two "
                    "`launch/torchrun.sh` lines, `LCV_NNODES=2`, one gloo rank each, tiny model) on one machine; "
                    "each fault once.\n")
        RESULTS.write_text(text.rstrip("\n") + "\n" + entry)


if __name__ == "__main__":
    main()
