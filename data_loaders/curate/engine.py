"""Run a function over many items in parallel: a local process pool, or Ray tasks on a cluster.

``run(fn, items, cfg)`` yields ``(item, result)`` as each task finishes (not in input order), so the
driver can count finished files as they land. ``fn`` must be a module-level function; with Ray the
output folder must be visible to every node (a shared filesystem), as the tasks write there.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("data_loaders.curate")

_ray_connected_here = False


def _local(fn: Callable, items: Sequence[tuple], workers: int) -> Iterator[tuple[tuple, Any]]:
    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        for it in items:
            yield it, fn(*it)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # fork, like torch's DataLoader on Linux: workers start at once with everything already imported
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, *it): it for it in items}
        for f in as_completed(futures):
            yield futures[f], f.result()


def _ray(fn: Callable, items: Sequence[tuple], address: str | None) -> Iterator[tuple[tuple, Any]]:
    import ray

    global _ray_connected_here
    if not ray.is_initialized():
        _ray_connected_here = True
        # workers must import this package: ship the folder that holds it on PYTHONPATH
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        log.info("curate: connected to Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = {task.remote(*it): it for it in items}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield refs[ready[0]], ray.get(ready[0])


def close() -> None:
    """Disconnect from Ray if :func:`run` connected (a session the caller opened is left alone)."""
    global _ray_connected_here
    if _ray_connected_here:
        import ray

        ray.shutdown()
        _ray_connected_here = False


def run(fn: Callable, items: Sequence[tuple], engine: str, workers: int = 0, address: str | None = None
        ) -> Iterator[tuple[tuple, Any]]:
    if not items:
        return iter(())
    return _ray(fn, items, address) if engine == "ray" else _local(fn, items, workers)
