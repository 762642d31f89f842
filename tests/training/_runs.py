"""Helpers for tests that run the real ``lcv-train`` on a tiny synthetic set."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(root: Path, data_dir: Path) -> list[str]:
    return [f"run.root={root}", "logger=none", "model=tiny", f"synthetic.dir={data_dir}", "synthetic.n=48", "synthetic.frames=5",
            "synthetic.height=16", "synthetic.width=16", "data.buckets=[[5,16,16]]", "data.batch_size=4",
            "sample.frames=5", "sample.height=16", "sample.width=16", "sample.steps=2",
            "schedule.kind=constant", "schedule.warmup_steps=0", "eval.at_end=false"]


def env() -> dict:
    e = dict(os.environ)
    e.pop("WANDB_API_KEY", None)
    e.update(LCV_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def lcv_train(args: list[str], cwd: Path, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "lcv_train", *args], cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"lcv-train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_here(args: list[str]) -> dict:
    """``lcv_train(args)`` in this process: the same config composition and ``lcv_train.cli.run``, without a
    fresh interpreter's start-up (~5 s of importing torch and transformers on a 2-core box). For the
    single-process reference runs that distributed runs are compared with; a test of the command line itself
    (exit codes, printed lines, Hydra's run folder) runs ``lcv_train``. One thread and no progress bar, as
    ``env()`` gives the subprocesses. Not for runs that sample or evaluate with videos: after the trainer's
    sampling in this process, the clips test_curate.py encodes here come out a few bytes different from its
    pool workers' (when it runs later in the same session), so those runs stay subprocesses."""
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    import conf
    from lcv_train.cli import run

    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=list(args))
    assert not cfg.trainer.sample_at_end and not cfg.trainer.sample_every and not cfg.eval.at_end \
        and not cfg.eval.every, "train_here: a run that samples or evaluates runs as a subprocess (lcv_train)"
    threads, progress = torch.get_num_threads(), os.environ.get("LCV_NO_PROGRESS")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    torch.set_num_threads(1)
    os.environ["LCV_NO_PROGRESS"] = "1"
    try:
        return run(cfg)
    finally:  # leave this process as it was: no process group, signal handlers or run log files
        if dist.is_initialized():
            dist.destroy_process_group()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_lcv", False)]:
            root.removeHandler(h)
            h.close()
        torch.set_num_threads(threads)
        if progress is None:
            os.environ.pop("LCV_NO_PROGRESS")
        else:
            os.environ["LCV_NO_PROGRESS"] = progress


def losses(run_dir: Path) -> dict[int, float]:
    return {d["step"]: d["train/loss"] for d in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
