"""launch/slurm/train.sbatch and the lcv_slurm submitit preset on a real one-node SLURM cluster.

Two training processes on one CPU node (gloo): sbatch -> one srun task -> launch/torchrun.sh -> 2 ranks.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._support import REPO, TINY, TRAIN_SBATCH, launch_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _submit(cluster, tmp_path: Path, *overrides: str, job_name: str = "lcv") -> int:
    # The script's defaults ask for 8 GPUs and 64 CPUs per node; this node has no GPUs and few CPUs.
    return cluster.sbatch("--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}", "--time=5",
                          f"--job-name={job_name}", str(TRAIN_SBATCH),
                          f"run.root={tmp_path / 'outputs'}", *TINY, *overrides,
                          cwd=tmp_path, env=launch_env(LCV_NPROC_PER_NODE="2", LCV_ROOT=str(REPO)))


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def test_sbatch_trains_two_ranks_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """sbatch -> srun -> torchrun.sh -> 2 ranks train to the end and leave the final checkpoint; on the way,
    the time-limit path: USR1 to the batch shell -> checkpoint now -> requeue -> resume there.

    No periodic checkpoints (checkpoint_every > max_steps), so the only checkpoint before the
    requeue is the one the signal asked for (periodic checkpoints under sbatch: the fault/requeue test).
    One job for both (it was two: a plain 4-step job, then this one), since each job start costs a torchrun
    and two ranks' imports.
    """
    job = _submit(slurm_cluster, tmp_path, "trainer.max_steps=16", "trainer.checkpoint_every=1000")
    run = tmp_path / "outputs" / f"lcv-{job}"
    rank0 = run / "logs" / "rank0.log"
    deadline = time.monotonic() + 120
    while not (rank0.exists() and "step 2 loss" in rank0.read_text()):
        assert time.monotonic() < deadline, "training did not start\n" + slurm_cluster.logs()
        state = slurm_cluster.job(job).state
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} is {state}\n" + (tmp_path / f"lcv-{job}.out").read_text())
        time.sleep(0.2)
    # What --signal=B:USR1@180 does shortly before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm_cluster.env(), check=True)

    info = slurm_cluster.wait(job, timeout=180)
    out = (tmp_path / f"lcv-{job}.out").read_text()
    assert info.state == "COMPLETED" and info.exit_code == "0:0", f"{info.state} {info.exit_code}\n{out}"
    assert info.restarts == 1, out
    assert "got USR1" in out and "restart 1" in out, out
    log = rank0.read_text()
    assert "received signal 15" in log, log
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log
    step = int(resumed[0].rsplit("at step", 1)[1])
    assert 2 <= step < 16, resumed[0]
    assert f"step_{step:07d}" in resumed[0]
    assert _latest(run) == "step_0000016"
    assert (run / "checkpoints" / "step_0000016").is_dir()
    for rank in (0, 1):
        assert "step 16 loss" in (run / "logs" / f"rank{rank}.log").read_text()
    assert "--nproc-per-node 2" in out and "rdzv-endpoint localhost:" in out


def test_submitit_lcv_slurm_preset_runs_two_tasks(slurm_cluster, tmp_path):
    """`lcv-train --multirun hydra/launcher=lcv_slurm` submits, runs 2 ranks (one per task), returns."""
    cmd = [sys.executable, "-m", "lcv_train", "--multirun", "hydra/launcher=lcv_slurm",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5",
           f"run.root={tmp_path / 'outputs'}", "run.name=sub", "trainer.max_steps=2",
           "trainer.checkpoint_every=2", *TINY]
    r = subprocess.run(cmd, cwd=tmp_path, env=slurm_cluster.env(launch_env()), capture_output=True,
                       text=True, timeout=240)
    run = tmp_path / "outputs" / "sub"
    task_logs = "\n".join(p.read_text() for p in sorted((tmp_path / "outputs").rglob("*_log.out")))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{task_logs[-3000:]}"
    assert _latest(run) == "step_0000002", task_logs
    for rank in (0, 1):
        assert "step 2 loss" in (run / "logs" / f"rank{rank}.log").read_text()


def _wait_for_step(cluster, job: int, run: Path, tmp_path: Path, step: int) -> None:
    rank0 = run / "logs" / "rank0.log"
    deadline = time.monotonic() + 150
    while not (rank0.exists() and f"step {step} loss" in rank0.read_text()):
        assert time.monotonic() < deadline, "training did not start\n" + cluster.logs()
        state = cluster.job(job).state
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} is {state}\n" + (tmp_path / f"lcv-{job}.out").read_text())
        time.sleep(0.2)


def test_sbatch_configuration_error_is_not_requeued(slurm_cluster, tmp_path):
    """Exit 2 (a configuration error) ends the job at once with one line per node: no torchrun restart,
    no requeue."""
    job = _submit(slurm_cluster, tmp_path, "trainer.max_steps=2", "parallel.cp=3")  # 3 does not divide 2 ranks
    info = slurm_cluster.wait(job, timeout=150)
    out = (tmp_path / f"lcv-{job}.out").read_text()
    assert info.state == "FAILED" and info.exit_code == "2:0" and info.restarts == 0, f"{info}\n{out}"
    errors = [line for line in out.splitlines() if "lcv-train: error:" in line]
    assert len(errors) == 1 and "parallel" in errors[0], out
    assert "requeueing" not in out and "Traceback" not in out, out


def test_sbatch_requeues_after_a_fault_and_after_a_node_failure(slurm_cluster, tmp_path):
    """Two faults, each followed by a resume from the latest checkpoint:
    1. a rank killed once torchrun has no restarts left (LCV_MAX_RESTARTS=0): srun fails and the script
       requeues the job (a fault, not a configuration error);
    2. the node fails (scontrol sets it DOWN): SLURM kills the job and requeues it itself (--requeue); it
       runs again once the node is back."""
    import psutil

    job = slurm_cluster.sbatch("--gpus-per-node=0", f"--cpus-per-task={slurm_cluster.cpus}", "--time=5",
                               "--job-name=lcv", str(TRAIN_SBATCH), f"run.root={tmp_path / 'outputs'}", *TINY,
                               "trainer.max_steps=20", "trainer.checkpoint_every=2", cwd=tmp_path,
                               env=launch_env(LCV_NPROC_PER_NODE="2", LCV_ROOT=str(REPO), LCV_MAX_RESTARTS="0"))
    run = tmp_path / "outputs" / f"lcv-{job}"
    _wait_for_step(slurm_cluster, job, run, tmp_path, 3)
    victims = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("SLURM_JOB_ID") == str(job) and env.get("RANK") == "1" and "lcv_train" in " ".join(p.cmdline()):
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert victims, "rank 1 not found"
    for p in victims:
        p.kill()
    rank0 = run / "logs" / "rank0.log"
    deadline = time.monotonic() + 180
    while "resumed from" not in rank0.read_text() or "step 8 loss" not in rank0.read_text():
        assert time.monotonic() < deadline, (tmp_path / f"lcv-{job}.out").read_text() + slurm_cluster.logs()
        time.sleep(0.2)
    node = slurm_cluster.NODE
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=lcv-test-node-failure"],
                   env=slurm_cluster.env(), check=True)
    try:
        slurm_cluster.wait_state(job, {"PENDING"}, timeout=60)
    finally:
        # The node comes back: this cluster's ReturnToService=2 does it when slurmd registers again;
        # otherwise resume it (refused while the killed job's processes are still being reaped).
        deadline = time.monotonic() + 60
        while "down" in slurm_cluster.node_state().lower():
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=slurm_cluster.env(),
                           capture_output=True)
            assert time.monotonic() < deadline, slurm_cluster.node_state() + "\n" + slurm_cluster.logs()
            time.sleep(1)
    info = slurm_cluster.wait(job, timeout=240)
    out = (tmp_path / f"lcv-{job}.out").read_text()
    assert info.state == "COMPLETED" and info.restarts == 2, f"{info.state} {info.restarts}\n{out}"
    assert "requeueing job" in out and "after a fault" in out, out
    resumed = [int(line.rsplit("at step", 1)[1]) for line in rank0.read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 2 and 2 <= resumed[0] < resumed[1] and resumed[1] >= 8, resumed
    assert _latest(run) == "step_0000020"
