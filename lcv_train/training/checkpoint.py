"""Checkpoints: sharded through torch.distributed.checkpoint, published atomically, resumable.

Layout of a run's ``checkpoints/`` directory::

    step_0000100/            one published checkpoint
        .metadata, *.distcp  DCP: model, optimizer, lr schedule, EMA, step (sharded, any world size)
        rank_00000.pt ...    per-rank state: data loader position, RNG states (plain data: tensors,
                             numbers, strings, lists, dicts; read with ``weights_only=True``)
        meta.json            model config, step, world/dp size
    latest                   text file naming the newest published directory

A checkpoint is written to ``step_N.tmp`` and renamed once every rank has finished, then ``latest`` is
replaced atomically. An interrupted save leaves only a ``.tmp`` directory (removed at the next start);
what ``latest`` names is always complete and loadable. Old checkpoints are pruned by renaming them to
``*.tmp`` first, so a prune killed half-way never leaves a half-deleted directory that looks complete.
A full disk stops the save with one line naming the directory and the space needed; the partial
``.tmp`` is removed and the previous checkpoint is untouched. A cheap free-space check (the size of the
previous checkpoint against the free space) runs before each save.

Trust: the per-rank files never run code when read. DCP's ``.metadata`` is a pickle that
``torch.distributed.checkpoint`` unpickles on load, so resume (and ``lcv-export``) only checkpoints you
trust; share weights as the published safetensors ``lcv-export`` writes.
"""

from __future__ import annotations

import contextlib
import errno
import io
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
from torch.distributed.checkpoint.api import CheckpointException

from lcv_train.errors import CheckpointError
from parallel.dims import any_rank as _any_rank

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

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain data only (no numpy arrays), so the file loads with torch.load(weights_only=True).
    numpy_state = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
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

    def _latest_or_none(self) -> Path | None:
        try:
            return self.latest()
        except CheckpointError:
            return None

    def clean_stale(self) -> None:
        """Remove ``.tmp`` directories left by interrupted saves (rank 0 only)."""
        if _rank() == 0 and self.dir.is_dir():
            for p in self.dir.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # -- save / load ---------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Every rank calls this. ``state`` holds DCP-saveable objects (``Stateful`` or tensors);
        ``rank_state`` is this rank's private state, written to ``rank_XXXXX.pt``: plain data only (tensors,
        numbers, str, lists, dicts), so it is read back without unpickling code."""
        with _finish_before_interrupt():
            return self._save(step, state, rank_state, meta)

    def _save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        name = f"step_{step:07d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        previous = self._latest_or_none() if _rank() == 0 else None
        self._check_free_space(name, previous)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        error: BaseException | None = None
        try:
            _dcp_save(state, str(tmp))
            _write_bytes(tmp / f"rank_{_rank():05d}.pt", _rank_state_bytes(rank_state))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank learns of it, then it is raised
            error = e
        if _any_rank(error is not None):
            self._abandon(name, tmp, previous, error)
        if _rank() == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": _world()}, indent=2))
            if final.exists():
                _remove_by_renaming(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / "latest.tmp-pointer"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune()
        _barrier()
        return final

    def _check_free_space(self, name: str, previous: Path | None) -> None:
        """Before writing: a new checkpoint needs about as much as the previous one (rank 0 checks, all agree)."""
        short = None
        if _rank() == 0 and previous is not None:
            need, free = _tree_bytes(previous), free_bytes(self.dir)
            if free < need:
                short = f"{_size(need)} needed (the size of {previous.name}), {_size(free)} free"
        if _any_rank(short is not None):
            raise CheckpointError(f"not enough disk space for checkpoint {name} in {self.dir}: "
                                  f"{short or 'see rank 0'}; free space there (or lower trainer.keep_last) and "
                                  f"resume; the previous checkpoint is intact")

    def _abandon(self, name: str, tmp: Path, previous: Path | None, error: BaseException | None) -> None:
        """A rank failed to write: remove the partial ``.tmp`` and raise one line (a full disk names its
        directory and the space needed)."""
        written = _tree_bytes(tmp)  # before the barrier: after it, rank 0 removes the directory
        _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was published"
        if error is None:
            raise CheckpointError(f"checkpoint {name}: another rank failed to write it (see its log); {kept}")
        if _is_disk_full(error):
            need = (f"about {_size(_tree_bytes(previous))} needed (the size of {previous.name})" if previous
                    else f"more than {_size(written)} needed (written before the disk filled)")
            raise CheckpointError(f"no space left on device for checkpoint {name} in {self.dir}: {need}, "
                                  f"{_size(free_bytes(self.dir))} free; free space there (or lower "
                                  f"trainer.keep_last) and resume; {kept}") from error
        raise error

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[: max(len(done) - self.keep_last, 0)]:
            _remove_by_renaming(p)

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
        _dcp_load(state, path)
        rank_file = path / f"rank_{_rank():05d}.pt"
        if meta.get("world_size") == _world() and rank_file.is_file():
            return _read_rank_state(rank_file)
        log.warning("checkpoint %s was written by %s ranks, resuming on %s: data loader position and RNG "
                    "states are not restored", path, meta.get("world_size"), _world())
        return None


# -- helpers ---------------------------------------------------------------------------------------
def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path``; 0 for a missing directory."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:  # removed while we walk (another rank abandoning); it no longer counts
                pass
    return total


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in ``error``: its cause chain, or the per-rank failures DCP collects."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        for f in getattr(e, "failures", {}).values():
            todo.append(f[0] if isinstance(f, tuple) else f)
        todo += [e.__cause__, e.__context__]
    return False


def _remove_by_renaming(path: Path) -> None:
    """Rename to ``*.tmp`` (atomic), then delete: a kill in between leaves a ``.tmp`` that the next start
    removes, never a half-deleted directory under a published name."""
    trash = path.with_name(f"{path.name}.deleting.tmp")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_bytes(path: Path, data: bytes) -> None:
    """A plain write (an ENOSPC arrives as an OSError naming it, unlike torch.save's zip writer)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rank_state_bytes(rank_state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(rank_state, buf)
    data = buf.getvalue()
    try:  # never write what could not be read back as data
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"per-rank checkpoint state must be plain data (tensors, numbers, str, list, dict): {e}") from e
    return data


def _read_rank_state(rank_file: Path) -> dict[str, Any]:
    """This rank's state, read as data: ``weights_only=True`` builds tensors and plain containers only, so
    a crafted file cannot run code."""
    try:
        return torch.load(rank_file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{rank_file}: per-rank state is not plain data, refusing to unpickle it ({first}); "
                              f"delete the rank_*.pt files of that checkpoint to resume without the data "
                              f"position and RNG states") from e


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` with one line when files are missing or unreadable (a ``CheckpointError`` from a
    state's ``load_state_dict``, e.g. another model, is passed on as it is)."""
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException)
        inner = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        for f in inner:
            if isinstance(f, CheckpointError):
                raise f from e
        cause = inner[0] if inner and isinstance(e, CheckpointException) else e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if isinstance(cause, KeyError) or first.startswith("Missing key"):  # readable, but other state than ours
            raise CheckpointError(f"checkpoint {path} does not hold this run's training state ({type(cause).__name__}: "
                                  f"{first}): it was written by another setup or an older lcv-train (e.g. before "
                                  f"optimizer parameter groups); start from its weights instead: trainer.resume=none "
                                  f"trainer.init_from={path} trainer.init_weights=model") from e
        raise CheckpointError(f"checkpoint {path} is incomplete or unreadable ({type(cause).__name__}: {first}); "
                              f"point trainer.resume at another checkpoint directory") from e
