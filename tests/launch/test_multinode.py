"""Two emulated nodes (two ``launch/torchrun.sh`` lines, one rank each, gloo): a config that differs between
nodes, a frozen rank, the loss of each node, and who writes the run folder's shared files."""

from __future__ import annotations

import re
import signal
import time

import pytest

from ._nodes import Node, free_port, start_mismatched_nodes, start_store, steps_logged, train_args, wait_for_step

pytestmark = pytest.mark.slow


def test_nodes_with_different_configs_stop_at_once_naming_the_key(tmp_path):
    """Catches: node B started with another optim.lr trained side by side with node A at a different lr,
    and exited 0 (or, with another checkpoint_every, hung at the first save). Now both nodes stop before
    training, with one line naming the key, exit 2, and no elastic restart (3 were allowed)."""
    t0 = time.monotonic()
    a, b = start_mismatched_nodes(tmp_path)
    try:
        rc_a, rc_b = a.wait(180), b.wait(180)
    finally:
        a.kill(), b.kill()
    elapsed = time.monotonic() - t0
    for node, rc in ((a, rc_a), (b, rc_b)):
        out = node.log()
        errors = [line for line in out.splitlines() if line.startswith("lcv-train: error:")]
        assert rc == 2 and len(errors) == 1, out[-4000:]
        assert "optim.lr is 0.0005 on rank 1" in errors[0] and "differing keys: optim.lr;" in errors[0], errors
        assert "Traceback" not in out and "restart" not in out.lower().replace("max-restarts", ""), out[-4000:]
    run = tmp_path / "outputs" / "mn"
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists()  # stopped before the first step
    print(f"mismatch: both nodes exited 2 after {elapsed:.1f} s (start-up included)")


def test_frozen_rank_ends_the_job_naming_step_and_phase(tmp_path):
    """Catches a silent hang: a rank that stops answering (SIGSTOP: a frozen node) used to leave the others
    in a collective for gloo's 30-minute default. Now they end within trainer.collective_timeout_s with a
    line naming the step and the phase (no restarts allowed here, so the job ends). A freeze that lands in a
    save (every 3 steps) waits trainer.save_timeout_s instead, so that is 20 s here, not the 30-minute default
    (a loaded CI box once froze B mid-save and the job outlived the test's 120 s)."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = train_args(tmp_path, "trainer.max_steps=200", "trainer.checkpoint_every=3",
                      "trainer.collective_timeout_s=10", "trainer.save_timeout_s=20")
    a = Node("A", tmp_path, endpoint, args, LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="0")
    b = Node("B", tmp_path, endpoint, args, LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="0")
    run = tmp_path / "outputs" / "mn"
    try:
        wait_for_step(run / "logs" / "rank0.log", 4, [a, b])
        (frozen,) = b.workers()
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc = a.wait(120)
        detected = time.monotonic() - t0
    finally:
        a.kill(), b.kill()
    out = a.log()
    lines = [line for line in out.splitlines()
             if line.startswith("lcv-train: error: step ") and re.search(r"still running after (10|20) s", line)]
    assert rc != 0 and lines, out[-4000:]
    phase = lines[0].split(": phase ", 1)[1].split()[0]
    assert phase in ("forward", "backward", "optimizer", "sync", "save"), lines[0]
    limit = 20 if "after 20 s" in lines[0] else 10
    assert (limit == 20) == (phase == "save"), lines[0]  # the save limit for saves only
    assert limit <= detected < limit + 50, detected
    assert not list((run / "checkpoints").glob("*.tmp")), "a half-written checkpoint was left behind"
    print(f"frozen rank: {lines[0]!r}, job ended {detected:.1f} s after the freeze")


def test_each_node_lost_in_turn_recovers_and_resumes_exactly(tmp_path):
    """Losing the first node used to end the job (it hosted the rendezvous store). With the store outside
    the agents (launch/rdzv_store.py, LCV_RDZV_IS_HOST=0), node B is killed (-9, agent and worker), then
    restarted; later node A likewise. Each time the survivor notices, waits, and both resume from the
    latest checkpoint; the steps computed twice (before the kill and after the resume) give the same loss
    and grad norm, and the run ends at max_steps. Only rank 0 writes lcv-train.log and .hydra/."""
    store, endpoint = start_store(tmp_path)
    total = 20  # enough for two kills, each after a checkpoint newer than the last resume
    args = train_args(tmp_path, f"trainer.max_steps={total}", "trainer.checkpoint_every=4")
    env = dict(LCV_NPROC_PER_NODE="1", LCV_MAX_RESTARTS="2", LCV_RDZV_IS_HOST="0")
    a = Node("A", tmp_path, endpoint, args, **env)
    b = Node("B", tmp_path, endpoint, args, **env)
    run = tmp_path / "outputs" / "mn"
    rank0, rank1 = run / "logs" / "rank0.log", run / "logs" / "rank1.log"
    timings = []
    try:
        # rank0.log: whichever node holds rank 0 in an attempt (the rendezvous may swap them) appends to it.
        for victim, kill_at in ((b, 6), (a, 14)):
            wait_for_step(rank0, kill_at, [a, b])
            before = len(steps_logged(rank0))
            published = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
            t_kill = time.monotonic()
            victim.kill()
            survivor = a if victim is b else b
            # The survivor's worker ends (detected) and its agent waits in the rendezvous for the lost node.
            deadline = time.monotonic() + 120
            while survivor.workers():
                assert time.monotonic() < deadline, survivor.log()[-3000:]
                time.sleep(0.1)
            t_detect = time.monotonic() - t_kill
            t_restart = time.monotonic()
            victim.start()
            deadline = time.monotonic() + 240
            while len(steps_logged(rank0)) <= before:
                assert time.monotonic() < deadline, survivor.log()[-3000:] + victim.log()[-3000:]
                time.sleep(0.2)
            timings.append((victim.name, t_detect, time.monotonic() - t_restart, published))
        rc_a, rc_b = a.wait(240), b.wait(240)
    finally:
        a.kill(), b.kill()
        store.kill()
    assert rc_a == 0 and rc_b == 0, a.log()[-3000:] + b.log()[-3000:]
    resumed = [line for line in rank0.read_text().splitlines() if "resumed from" in line]
    steps = [int(line.rsplit("at step", 1)[1]) for line in resumed]
    assert len(steps) == 2 and all(s % 4 == 0 for s in steps), resumed
    # From the newest checkpoint published before the kill, or one published while the survivor stopped.
    assert all(t[3] <= s < t[3] + 8 for t, s in zip(timings, steps)), (timings, resumed)
    twice = 0
    for log in (rank0, rank1):
        first: dict[int, str] = {}
        for step, values in steps_logged(log):
            twice += step in first
            assert first.setdefault(step, values) == values, f"step {step} differs after the resume: {log}"
        assert sorted(first) == list(range(1, total + 1)), log
    assert twice > 0, "no step was computed both before a kill and after the resume"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:07d}"
    # Shared files: one line per step from rank 0 only; .hydra/ is rank 0's.
    shared = (run / "lcv-train.log").read_text()
    assert shared.count(f"step {total} loss") == 1 and "rank1" not in shared
    assert (run / ".hydra" / "config.yaml").is_file()
    for name, detect, recover, _ in timings:
        print(f"lost node {name}: survivor's workers ended {detect:.1f} s after the kill; "
              f"first new step {recover:.1f} s after the node was restarted")


def test_layout_error_under_torchrun_is_one_line_exit_2_without_restarts(tmp_path):
    """Issue #10 item 6: a bad layout was printed once per rank, retried 3 times (~25 s) and ended in
    torchrun's ChildFailedError traceback with exit 1. Now: one line, exit 2, no restart."""
    import subprocess

    from ._support import TORCHRUN_SH, launch_env

    r = subprocess.run([str(TORCHRUN_SH), *train_args(tmp_path, "run.name=bad", "parallel.cp=3")], cwd=tmp_path,
                       env=launch_env(LCV_NPROC_PER_NODE="2", LCV_NO_PROGRESS="1"), capture_output=True, text=True,
                       timeout=180)
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines()
              if "error" in line.lower() and not line.startswith("torchrun.sh [")]
    assert r.returncode == 2, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith("lcv-train: error: parallel"), out
    assert "Traceback" not in out and "ChildFailedError" not in out and "restart" not in out.lower().replace(
        "max-restarts", ""), out[-3000:]
