"""torchrun's elastic restart: a rank killed mid-run, the group restarts and resumes from the checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from ._support import TINY, TORCHRUN_SH, launch_env

pytestmark = pytest.mark.slow


def _worker(agent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in agent.children(recursive=True):
        try:
            if "lcv_train" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_rank_restarts_group_and_resumes_from_latest_checkpoint(tmp_path):
    run = tmp_path / "outputs" / "elastic"
    log = open(tmp_path / "torchrun.log", "w")
    env = launch_env(LCV_NPROC_PER_NODE="2", LCV_MAX_RESTARTS="1")
    # torchrun.sh execs torchrun, so this pid is the elastic agent; its children are the workers.
    proc = subprocess.Popen([str(TORCHRUN_SH), f"run.root={tmp_path / 'outputs'}", "run.name=elastic",
                             "trainer.max_steps=16", "trainer.checkpoint_every=4", *TINY],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        latest = run / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists():
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint published\n" + (tmp_path / "torchrun.log").read_text()
            time.sleep(0.1)
        victim = _worker(psutil.Process(proc.pid), rank=1)
        assert victim is not None, "rank 1 worker not found"
        killed_after = latest.read_text().strip()
        victim.send_signal(signal.SIGKILL)

        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert rc == 0, out
    # Workers were restarted once (TORCHELASTIC_RESTART_COUNT=1) and resumed from a checkpoint at or
    # after the one published before the kill (another may have landed before the group stopped).
    log0 = (run / "logs" / "rank0.log").read_text()
    resumed = [line for line in log0.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log0
    step = int(resumed[0].rsplit("at step", 1)[1])
    assert int(killed_after.removeprefix("step_")) <= step < 16, (killed_after, resumed[0])
    assert step % 4 == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000016"
    assert "step 16 loss" in log0 and "step 16 loss" in (run / "logs" / "rank1.log").read_text()
