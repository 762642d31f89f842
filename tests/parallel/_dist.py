"""Run a function on N CPU processes joined by a gloo process group (torch.multiprocessing spawn).

``run_distributed(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` in every process; ``fn``
must be a module-level function. A failure (assertion or exception) in any rank fails the caller; a hang
fails after ``timeout_s`` through the process group timeout.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children's OpenMP at start-up
    try:
        mp.spawn(_worker, args=(world_size, free_port(), timeout_s, fn, args), nprocs=world_size, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


# -- a reusable pool: spawn (and import torch) once per world size, run many checks -----------------

def _pool_worker(rank, world_size, port, timeout_s, tasks, results) -> None:
    import traceback

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        while True:
            item = tasks.get()
            if item is None:
                break
            fn, args = item
            try:
                fn(rank, world_size, *args)
                dist.barrier()
                results.put((rank, None))
            except BaseException:  # report, then keep serving (the pool is discarded by the parent)
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class DistPool:
    """``world_size`` spawned processes in one gloo group that run ``fn(rank, world_size, *args)`` on
    request. After a failure the pool is closed (ranks may be stuck in a collective) and must be rebuilt."""

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout_s, self.alive = world_size, timeout_s, True
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self.procs = [ctx.Process(target=_pool_worker, args=(r, world_size, port, timeout_s, self.tasks[r],
                                                                 self.results), daemon=True)
                          for r in range(world_size)]
            for p in self.procs:
                p.start()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old

    def run(self, fn, *args, timeout_s: float = 180.0) -> None:
        import queue

        if not self.alive:
            raise RuntimeError("DistPool was closed after a failure")
        for q in self.tasks:
            q.put((fn, args))
        errors = []
        for _ in range(self.world_size):
            try:
                rank, err = self.results.get(timeout=timeout_s if not errors else 5.0)
            except queue.Empty:
                errors.append("(some ranks did not finish: hang or crash)")
                break
            if err is not None:
                errors.append(f"rank {rank}:\n{err}")
        if errors:
            self.close()
            raise AssertionError("distributed check failed\n" + "\n".join(errors))

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


_POOLS: dict[int, DistPool] = {}


def get_pool(world_size: int) -> DistPool:
    """A live pool of ``world_size`` gloo ranks, shared by the tests of a session."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = DistPool(world_size)
    return pool


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
