"""The training loader: readers in DataLoader workers, interleaved round-robin, with exact resume.

Order: with W workers (W = max(1, num_workers)), batch n of a rank comes from logical reader n % W
(torch's DataLoader hands out work to workers in a fixed cycle and returns results in order). Every
batch carries its reader's snapshot (position in each subset's units, references to the samples in
its shuffle buffer and partial batches, counters); the loader keeps, per reader, the snapshot of the
last batch the *trainer consumed* (not the prefetched ones). ``state_dict()`` is those, plus the number
of consumed batches n. A fresh loader given that state maps DataLoader worker i to logical reader
(i + n) % W, so the first batch comes from the reader whose turn it was, and each reader restores its
snapshot (re-reading only the referenced samples, decoding nothing). The next batch is exactly batch
n + 1 of the uninterrupted run.

Changing world_size or num_workers between save and load cannot be exact (the split of units over
readers changes). Then the loader warns and starts every subset at the start of the lowest epoch any
reader of this rank had reached: no sample is lost, some of that epoch are seen twice.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import time
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_loaders.config import DataConfig, DataConfigError, DataError, subsets_of, to_data_config, validate
from data_loaders.pipeline import BAD_REASONS, Plan, Reader, SubsetPlan
from data_loaders.shards import make_units, resolve_shards

log = logging.getLogger("data_loaders")
STATE_VERSION = 1


class _ReaderDataset(IterableDataset):
    """What each DataLoader worker runs: the reader whose turn matches its shifted worker id."""

    def __init__(self, plan: Plan, shift: int, resume: dict[int, dict]):
        super().__init__()
        self.plan = plan
        self.shift = shift
        self.resume = resume

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        logical = (wid + self.shift) % self.plan.workers
        return _errors_as_items(Reader(self.plan, logical, self.resume.get(logical)).batches())


# A worker's user-facing error travels to the trainer as an item, so it arrives as the same one line it
# would be with num_workers=0 (torch would re-raise it wrapped in "Caught DataError in DataLoader worker
# process 0" and a traceback).
_WORKER_ERROR = "__lcv_worker_error__"
_USER_ERRORS = {"DataError": DataError, "DataConfigError": DataConfigError}


def _errors_as_items(batches: Iterator) -> Iterator:
    try:
        yield from batches
    except (DataError, DataConfigError) as e:
        yield _WORKER_ERROR, (type(e).__name__, str(e))


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT/SIGUSR1: SLURM, torchrun and a terminal's Ctrl-C signal the
    whole process group, and the trainer (which gets the same signal) decides when to stop; a worker that
    died of it would crash the trainer instead of letting it checkpoint. The trainer shuts workers down."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _identity(item):
    return item


class _SerialReaders:
    """num_workers == 0: the W = 1 reader, in this process."""

    def __init__(self, plan: Plan, resume: dict[int, dict]):
        self.it = Reader(plan, 0, resume.get(0)).batches()

    def __iter__(self):
        return self.it


def make_plan(cfg: DataConfig, rank: int, world_size: int, seed: int) -> Plan:
    validate(cfg)
    workers = max(1, cfg.num_workers)
    subsets = []
    offsets: dict[str, np.ndarray] = {}
    for name, sc in subsets_of(cfg).items():
        key = "data.shards" if not cfg.subsets else f"data.subsets.{name}.shards"
        shards = resolve_shards(list(sc.shards), key)
        for sh in shards:
            if sh.offsets is not None and sh.count is not None and len(sh.offsets) == sh.count:
                offsets[sh.url] = np.asarray(sh.offsets, dtype=np.int64)
        units = make_units(shards, world_size * workers, cfg.units_per_reader, key)
        subsets.append(SubsetPlan(name, float(sc.ratio), sc.filters, units))
    buckets = [tuple(int(v) for v in b) for b in cfg.buckets]
    return Plan(cfg, subsets, buckets, int(seed), int(rank), int(world_size), workers, offsets=offsets)  # type: ignore[arg-type]


class VideoLoader:
    """Infinite (or ``data.epochs``-long) iterable of batches for one rank. See the module docstring.

    ``iter(loader)`` returns the loader itself, so ``load_state_dict`` may be called before or after.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.cfg = cfg
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.plan = make_plan(cfg, rank, world_size, seed)
        self.workers = self.plan.workers
        self._consumed = 0
        self._samples = 0
        self._readers: dict[int, dict[str, Any]] = {}
        self._start_epochs: Optional[dict[str, int]] = None  # set by a load across a layout change
        self._it: Optional[Iterator] = None
        self._dl = None
        self._wait_s = 0.0
        self._last_wait_s = 0.0
        self._warned: set[str] = set()  # skip reasons already warned about

    # ------------------------------------------------------------------ iteration
    def _start(self) -> Iterator:
        shift = self._consumed % self.workers
        # Carry on from the last consumed batch of every reader (fresh start: nothing to skip).
        base = {"start_epochs": dict(self._start_epochs or {})}
        resume = {w: dict(base) for w in range(self.workers)}
        for w, snap in self._readers.items():
            resume[w]["snapshot"] = snap
        if self.cfg.num_workers == 0:
            return iter(_SerialReaders(self.plan, resume))
        ds = _ReaderDataset(self.plan, shift, resume)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.cfg.num_workers > cpus and self.rank == 0:  # one line instead of torch's paragraph
            log.warning("data.num_workers=%d is more than the %d CPUs this process may use; lower it if loading "
                        "is slow or the machine stalls", self.cfg.num_workers, cpus)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            self._dl = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                persistent_workers=True,
                prefetch_factor=self.cfg.prefetch_factor,
                in_order=True,
                pin_memory=bool(self.cfg.pin_memory) and torch.cuda.is_available(),
                timeout=float(self.cfg.worker_timeout_s),
                collate_fn=_identity,  # items are finished batches; keep tuples/lists exactly as built
                worker_init_fn=_ignore_stop_signals,
            )
            return iter(self._dl)

    def __iter__(self) -> "VideoLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = self._start()
        batch, info = next(self._it)
        while batch is None or isinstance(batch, str):
            if batch == _WORKER_ERROR:  # a worker's DataError: stop the workers, raise it here as itself
                self.close()
                raise _USER_ERRORS[info[0]](info[1])
            self._readers[int(info["worker"])] = info  # the end of a finite reader: its final counts, no batch
            batch, info = next(self._it)
        dt = time.perf_counter() - t0
        self._wait_s += dt
        self._last_wait_s = dt
        self._readers[int(info["worker"])] = info
        self._warn_new_skips()
        self._consumed += 1
        self._samples += len(batch["keys"])
        return batch

    def _warn_new_skips(self) -> None:
        """One console warning per skip reason (the readers log each sample to the log file only)."""
        for r in BAD_REASONS:
            if r in self._warned:
                continue
            n = sum(int(i["counters"].get(f"skipped/{r}", 0)) for i in self._readers.values())
            if n:
                self._warned.add(r)
                log.warning("data: skipping %s samples (%d so far): counted in data/skipped/%s, each named "
                            "(shard, key, cause) in the rank's log file", r, n, r)

    def close(self) -> None:
        """Stop the worker processes (they are also stopped when the loader is garbage-collected)."""
        it, self._it, self._dl = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # noqa: SLF001 - the public way is to drop the iterator

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "seed": self.seed,
            "consumed": self._consumed,
            "samples": self._samples,
            "wait_s": self._wait_s,
            "start_epochs": dict(self._start_epochs or {}),
            "readers": {str(w): copy.deepcopy(snap) for w, snap in sorted(self._readers.items())},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd.get("version", 0)) != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')} != {STATE_VERSION}")
        self.close()
        readers = {int(w): dict(v) for w, v in sd.get("readers", {}).items()}
        same = int(sd["world_size"]) == self.world_size and int(sd["num_workers"]) == self.cfg.num_workers and int(sd["seed"]) == self.seed
        if int(sd.get("rank", self.rank)) != self.rank:
            same = False
        if same:
            self._consumed = int(sd["consumed"])
            self._samples = int(sd.get("samples", 0))
            self._wait_s = float(sd.get("wait_s", 0.0))
            self._readers = readers
            self._start_epochs = dict(sd.get("start_epochs", {}))
        else:
            epochs: dict[str, int] = {}
            for v in readers.values():
                for name, e in v.get("epochs", {}).items():
                    epochs[name] = min(epochs.get(name, e), e)
            log.warning(
                "data: loader state was saved with world_size=%s num_workers=%s seed=%s rank=%s; now %s/%s/%s/%s: "
                "cannot resume exactly, restarting at epoch %s (some samples of that epoch are seen again)",
                sd["world_size"], sd["num_workers"], sd["seed"], sd.get("rank"),
                self.world_size, self.cfg.num_workers, self.seed, self.rank, epochs,
            )
            self._consumed = 0
            self._samples = int(sd.get("samples", 0))
            self._readers = {}
            self._start_epochs = epochs

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        counters: dict[str, int] = {}
        epochs: list[int] = []
        for info in self._readers.values():
            for k, v in info["counters"].items():
                counters[k] = counters.get(k, 0) + int(v)
            if info["epochs"]:
                epochs.append(min(info["epochs"].values()))
        bad = sum(counters.get(f"skipped/{r}", 0) for r in BAD_REASONS)
        read = counters.get("read", 0)
        filtered = sum(v for k, v in counters.items() if k.startswith("filtered/"))
        out: dict[str, float] = {
            "data/epoch": float(min(epochs) if epochs else 0),
            "data/batches": float(self._consumed),
            "data/samples": float(self._samples),
            "data/read": float(read),
            "data/skipped": float(bad),
            "data/filtered": float(filtered),
            "data/bad_fraction": float(bad / max(1, read - filtered)),
            "data/wait_s": float(self._wait_s),
            "data/last_wait_s": float(self._last_wait_s),
        }
        for r in BAD_REASONS:
            out[f"data/skipped/{r}"] = float(counters.get(f"skipped/{r}", 0))
        for k, v in counters.items():
            if k.startswith("filtered/"):
                out[f"data/{k}"] = float(v)
        return out


def build_loader(cfg: Any, rank: int, world_size: int, seed: int) -> VideoLoader:
    """The rank's loader (validates the config; raises ``DataConfigError`` naming the bad key)."""
    return VideoLoader(to_data_config(cfg), rank, world_size, seed)
