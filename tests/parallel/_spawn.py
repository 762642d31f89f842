"""Run a function on N CPU processes with gloo (for the multi-process layout tests).

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each calling ``fn(rank, world, *args)`` after
``init_process_group("gloo")`` with the torchrun environment variables set; failures re-raise in the parent.
Results come back through files in a temp dir (``torch.save`` of what ``fn`` returns)."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """Results of ``fn(rank, world, *args)`` on each rank, in rank order."""
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.start_processes(_entry, args=(world, free_port(), d, fn, args), nprocs=world, join=True,
                               start_method="spawn")
        except Exception as e:
            errs = [open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith(".err")]
            raise RuntimeError("worker failed:\n" + "\n".join(errs)) from e
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
