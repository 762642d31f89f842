"""The real ``lcv-train`` under attack (subprocesses, tiny model): SIGTERM to the whole process group as
SLURM and torchrun send it, a learning rate that diverges, a crafted data index and a worker-side data error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training._runs import env, lcv_train, tiny_overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _term_the_group_after_two_steps(cmd, run_dir: Path, cwd: Path) -> tuple[int, str]:
    """Start ``cmd`` in its own process group, wait for step 2, SIGTERM the whole group (what scancel,
    preemption and torchrun's agent do: the trainer and its DataLoader workers all get it)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 240
    while p.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()[0][-3000:]
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def _assert_stopped_with_a_checkpoint(run_dir: Path, out: str, ranks: int) -> int:
    assert "killed by signal" not in out and "exited unexpectedly" not in out, out[-3000:]
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("*.tmp")), list(ckpts.iterdir())
    step = max(r["step"] for r in _rows(run_dir))
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert latest.name == f"step_{step:07d}", (latest, step)  # the step the signal arrived in
    assert (latest / ".metadata").is_file() and len(list(latest.glob("rank_*.pt"))) == ranks
    for r in range(ranks):
        log = (run_dir / "logs" / f"rank{r}.log").read_text()
        assert "received signal 15" in log and f"saved checkpoint {latest}" in log, log[-2000:]
    return step


def test_sigterm_to_the_process_group_checkpoints_and_stops(runs):
    root, data = runs
    o = tiny_overrides(root, data) + ["run.name=term", "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                                      "trainer.sample_at_end=false", "data.num_workers=2"]
    rc, out = _term_the_group_after_two_steps([sys.executable, "-m", "lcv_train", *o], root / "term", root)
    assert rc == 0, out[-3000:]
    step = _assert_stopped_with_a_checkpoint(root / "term", out, ranks=1)
    assert f"stopped on request at step {step}; checkpoint saved" in out


def test_sigterm_to_the_process_group_under_torchrun(runs):
    """Bug caught: under torchrun the signal killed the DataLoader workers, the trainer died with "DataLoader
    worker ... killed by signal: Terminated" and no checkpoint (once mid-save, leaving a .tmp)."""
    root, data = runs
    o = tiny_overrides(root, data) + ["run.name=term2", "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                                      "trainer.sample_at_end=false", "parallel=fsdp", "parallel.backend=gloo",
                                      "data.num_workers=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lcv_train", *o]
    _, out = _term_the_group_after_two_steps(cmd, root / "term2", root)  # the agent itself reports the signal
    _assert_stopped_with_a_checkpoint(root / "term2", out, ranks=2)


def test_diverging_lr_stops_with_one_line_and_publishes_only_finite_weights(runs):
    """Bug caught: optim.lr=1e4 gave NaN from step 2-4, training went on, wrote NaN checkpoints (keep_last
    rotated the good ones out), rendered the sample from NaN, and exited 0."""
    from lcv_train.checkpoints.ours import read_our_weights

    root, data = runs
    o = tiny_overrides(root, data) + ["run.name=diverge", "trainer.max_steps=12", "trainer.checkpoint_every=1",
                                      "trainer.skip_nonfinite_steps=1", "optim.lr=1e4"]
    p = lcv_train(o, cwd=root, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("lcv-train: error: step ") and "is not finite" in last, last
    bad_step = int(last.split("step ")[1].split(":")[0])
    assert bad_step < 12 and not (root / "diverge" / "samples").exists()
    published = sorted((root / "diverge" / "checkpoints").glob("step_*"))
    assert published and all(int(c.name.split("_")[1]) < bad_step for c in published)
    for ckpt in published:
        for which in ("model", "ema"):
            _, weights = read_our_weights(ckpt, which)
            assert all(torch.isfinite(w).all() for w in weights.values()), (ckpt, which)

    p = lcv_train(o[:-1] + ["run.name=lr-inf", "optim.lr=inf"], cwd=root, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "lcv-train: error: optim.lr: must be a finite number, got inf"


def _own_shards(root: Path, name: str) -> Path:
    from data_loaders.synthetic import ensure_synthetic_shards

    return Path(ensure_synthetic_shards(str(root / name), n=16, frames=5, height=16, width=16, fps=8.0, seed=0))


def test_crafted_index_runs_no_command_in_lcv_train(runs):
    root, data = runs
    shards = _own_shards(root, "crafted")
    index = json.loads((shards / "index.json").read_text())
    marker = root / "pwned"
    first = index["shards"][0]["path"]
    index["shards"][0]["path"] = f"pipe:touch {marker}; cat {shards / first}"
    (shards / "index.json").write_text(json.dumps(index))
    o = tiny_overrides(root, data) + ["run.name=crafted", "synthetic.enabled=false", f"data.shards=[{shards}]",
                                      "trainer.max_steps=2"]
    p = lcv_train(o, cwd=root, check=False)
    assert p.returncode == 2 and not marker.exists(), p.stderr[-3000:]
    assert "leaves the data folder" in p.stderr.strip().splitlines()[-1]


def test_worker_data_error_is_one_line_and_exit_2(runs):
    """Bug caught: a DataError raised in a DataLoader worker reached the user as "Caught DataError in
    DataLoader worker process 0" and a traceback."""
    from data_loaders.shards import ShardSetWriter

    root, data = runs
    w = ShardSetWriter(str(root / "garbage"), "pixel", max_count=8)
    for i in range(16):
        w.write({"__key__": f"g{i:02d}", "mp4": os.urandom(1500),
                 "json": {"caption": "x", "width": 16, "height": 16, "duration": 1.0, "fps": 8.0}})
    w.finish()
    o = tiny_overrides(root, data) + ["run.name=garbage", "synthetic.enabled=false", f"data.shards=[{root / 'garbage'}]",
                                      "trainer.max_steps=2", "data.num_workers=1", "+data.bad_min_samples=4"]
    p = lcv_train(o, cwd=root, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("lcv-train: error: data: ") and "were bad" in last, p.stderr[-3000:]
    assert "Caught" not in p.stderr and "Traceback" not in p.stderr
