"""Shared by the launch tests: the repo's launch scripts, tiny training overrides, the environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"

# The tiny CPU run: tiny DiT sharded over the ranks (gloo), small synthetic clips, one clip per rank per
# step, no logger, no sample.
TINY = [
    "model=tiny",
    "logger=none",
    "trainer.sample_at_end=false",
    "eval.at_end=false",
    "trainer.log_every=1",
    "data.batch_size=1",
    "data.num_workers=0",
    "data.buckets=[[5,16,16]]",
    "synthetic.n=32",
    "synthetic.frames=5",
    "synthetic.height=16",
    "synthetic.width=16",
    "parallel=fsdp",
    "parallel.backend=gloo",
]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment the launch scripts run with: this interpreter, this checkout, no GPUs."""
    env = dict(os.environ)
    env["PYTHON"] = sys.executable  # not a pyenv/conda shim: one less process, same packages
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    # Bound how long torchrun waits for workers after a failure or a signal before SIGKILL.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "10"
    env.update(extra)
    return env
