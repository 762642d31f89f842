"""Checkpoints: sharded through torch.distributed.checkpoint, published atomically, resumable.

Layout of a run's ``checkpoints/`` directory::

    step_0000100/            one published checkpoint
        .metadata, *.distcp  DCP: model, optimizer, lr schedule, EMA, step (sharded, any world size)
        rank_00000.pt ...    per-rank state: data loader position, RNG states
        meta.json            model config, step, world/dp size
    latest                   text file naming the newest published directory

A checkpoint is written to ``step_N.tmp`` and renamed once every rank has finished, then ``latest`` is
replaced atomically. An interrupted save leaves only a ``.tmp`` directory (removed at the next start);
what ``latest`` names is always complete and loadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lcv_train.errors import CheckpointError

log = logging.getLogger(__name__)

ARCHITECTURE_KEYS = ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                     "mlp_ratio", "ffn_multiple_of", "adaln_tembed_dim", "frequency_embedding_size", "patch_size")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _finish_before_interrupt():
    """Ctrl-C while a checkpoint is written: finish and publish it, then raise KeyboardInterrupt.
    A second Ctrl-C aborts at once (the unpublished ``.tmp`` directory is removed at the next start)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits: list[int] = []

    def handler(signum, _frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        log.warning("interrupted: finishing the checkpoint being written, then stopping (Ctrl-C again aborts it)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hits:
        raise KeyboardInterrupt


def _dcp_save(state, checkpoint_id: str) -> None:
    """``dcp.save`` that lets a KeyboardInterrupt be one (DCP wraps exceptions in CheckpointException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=checkpoint_id)
    except CheckpointException as e:
        if any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt) for f in e.failures.values()):
            raise KeyboardInterrupt from e
        raise


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # -- discovery -----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint "
                                  f"(no .metadata); point trainer.resume at another checkpoint directory")
        return path

    def clean_stale(self) -> None:
        """Remove ``.tmp`` directories left by interrupted saves (rank 0 only)."""
        if _rank() == 0 and self.dir.is_dir():
            for p in self.dir.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # -- save / load ---------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Every rank calls this. ``state`` holds DCP-saveable objects (``Stateful`` or tensors);
        ``rank_state`` is this rank's private state (pickled to ``rank_XXXXX.pt``)."""
        with _finish_before_interrupt():
            return self._save(step, state, rank_state, meta)

    def _save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        name = f"step_{step:07d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        _dcp_save(state, str(tmp))
        torch.save(rank_state, tmp / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": _world()}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / "latest.tmp-pointer"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[: max(len(done) - self.keep_last, 0)]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, state: dict[str, Any], expect_meta: dict[str, Any]) -> dict[str, Any] | None:
        """Load ``state`` in place; return this rank's private state, or None when the world size differs
        (the data loader then restarts its epoch and RNGs are reseeded — logged)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise CheckpointError(f"not a checkpoint: {meta_file} is missing (expected a step_N directory "
                                  f"written by lcv-train)")
        meta = json.loads(meta_file.read_text())
        want, have = json.loads(json.dumps(expect_meta.get("model"))), meta.get("model")
        if want is not None and have is not None:
            # Only what shapes the weights must match: switching attention (dense -> BSA) is a stage.
            diff = sorted(k for k in ARCHITECTURE_KEYS if want.get(k) != have.get(k))
        else:
            diff = []
        if diff:
            k = diff[0]
            raise CheckpointError(f"checkpoint {path} was written for a different model: model.{k} is "
                                  f"{have.get(k)!r} there and {want.get(k)!r} here (differing keys: {diff})")
        dcp.load(state, checkpoint_id=str(path))
        rank_file = path / f"rank_{_rank():05d}.pt"
        if meta.get("world_size") == _world() and rank_file.is_file():
            return torch.load(rank_file, weights_only=False)
        log.warning("checkpoint %s was written by %s ranks, resuming on %s: data loader position and RNG "
                    "states are not restored", path, meta.get("world_size"), _world())
        return None
