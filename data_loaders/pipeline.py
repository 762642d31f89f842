"""One reader's deterministic stream: units -> samples -> filters -> buckets -> batches.

A *reader* is one dataloader worker of one rank (``consumer = rank * W + worker``; ``C = world * W``
readers in all). For subset s and epoch e every reader computes the same permutation of the subset's
units (seeded by ``(seed, s, e)``) and takes ``units[consumer::C]``: every sample is read by exactly one
reader per epoch. Every random choice is seeded by (seed, reader, a counter), so a reader's stream is
a pure function of the config, its identity and the bytes it reads.

Work is split in two phases. *Planning* reads raw samples, parses the ``.json``, applies filters,
assigns buckets, shuffles (buffer), mixes subsets and groups samples into planned batches with a
task; it never decodes media. *Materialising* decodes a planned batch. A sample that fails to decode
is dropped from its batch (the batch is one smaller; an empty batch is not emitted), so batch
boundaries never depend on decoding.

Position: after each batch the reader reports a small snapshot (per subset: epoch, unit, samples read
in the unit, and *references* ``[subset, epoch, unit, index]`` to the samples waiting in its shuffle
buffer; the references of samples in partial batches; counters). Restoring re-opens each subset at
its unit and offset and re-reads only the referenced samples (a seek each, with an index), decoding
nothing: resume costs O(shuffle buffer + pending) sample reads, not the epoch so far.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_loaders.buckets import assign_bucket, sample_task
from data_loaders.config import DataConfig, DataError, FilterConfig, bucket_batch_size, latent_frames
from data_loaders.decode import DecodeError, available_frames, decode_image, decode_video, probe_image, probe_video
from data_loaders.shards import TruncatedShard, Unit, iter_unit, media_of

log = logging.getLogger("data_loaders")
# Each skipped sample (shard, key, cause), for the rank's log file; the console gets one warning per reason,
# from the loader in the training process (``VideoLoader``), however many worker processes read.
skip_log = logging.getLogger("data_loaders.skipped")

# Reasons a sample is skipped as bad (they count against max_bad_fraction).
BAD_REASONS = (
    "truncated_tar",
    "undecodable",
    "missing_caption",
    "missing_text",
    "missing_media",
    "bad_metadata",
    "too_short",
    "bucket_mismatch",
)
_MAX_LOGGED_PER_REASON = 20


@dataclass
class SubsetPlan:
    name: str
    ratio: float
    filters: FilterConfig
    units: list[Unit]


def pick_caption(meta: dict[str, Any], seed: int, epoch: int, key: str) -> Optional[str]:
    """The caption to train on: one of ``captions`` (a curated clip's augmented captions, ``lcv-data
    curate``) drawn from (seed, epoch, key) alone, so a resumed run sees the same one; else ``caption``."""
    options = [c for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    if not options:
        return meta.get("caption")
    return options[zlib.crc32(f"{seed}:{epoch}:{key}".encode()) % len(options)]


@dataclass
class Plan:
    """Everything a reader needs; picklable, so DataLoader workers get a copy."""

    cfg: DataConfig
    subsets: list[SubsetPlan]
    buckets: list[tuple[int, int, int]]
    seed: int
    rank: int
    world_size: int
    workers: int  # readers per rank (max(1, num_workers))
    offsets: dict[str, Any] = field(default_factory=dict)  # shard url -> per-sample byte offsets (np.int64)
    with_meta: bool = False  # add each sample's parsed .json as batch["meta"] (lcv-data encode)

    @property
    def readers(self) -> int:
        return self.world_size * self.workers


@dataclass
class Sample:
    key: str
    url: str
    subset: int
    epoch: int
    kind: str  # video | image | latent
    ext: str
    raw: dict[str, Any]
    meta: dict[str, Any]
    bucket: int
    caption: str = ""
    ref: tuple[int, int, int, int] = (0, 0, 0, 0)  # (subset, epoch, unit position in the epoch, index in unit)


@dataclass
class PlannedBatch:
    bucket: int
    kind: str
    samples: list[Sample]
    task: str
    num_cond_latents: int


@dataclass
class ReaderState:
    planned: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)


def _empty_shared(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor (float32 unless told); in a DataLoader worker it lives in shared memory (passing it on
    copies nothing)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    n = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)  # what torch's default_collate does too
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    except (AttributeError, RuntimeError):  # pragma: no cover - older/other torch builds
        return torch.empty(shape, dtype=dtype)


def _stack_float(arrays: list[np.ndarray]) -> torch.Tensor:
    out = _empty_shared((len(arrays),) + tuple(arrays[0].shape))
    for i, a in enumerate(arrays):
        out[i] = torch.from_numpy(a)
    return out


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _number(meta: dict, key: str) -> Optional[float]:
    v = meta.get(key)
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _local_size(url: str) -> Optional[int]:
    """The size of a local shard file; None for pipes and URLs."""
    if url.startswith("pipe:") or not os.path.isfile(url):
        return None
    return os.path.getsize(url)


def _read_one(unit: Unit) -> Optional[dict[str, Any]]:
    it = iter_unit(dataclasses.replace(unit, count=1))
    try:
        return next(it, None)
    finally:
        it.close()


class _Exhausted(Exception):
    """A finite (``data.epochs``) subset stream has no more samples."""


class _Stream:
    """Subset s as one reader sees it: its units epoch by epoch and a shuffle buffer, with an explicit
    position (so it can be snapshotted and restored without replaying)."""

    def __init__(self, reader: "Reader", s: int, epoch: int = 0):
        self.r = reader
        self.s = s
        self.name = reader.plan.subsets[s].name
        self.size = reader.cfg.shuffle_buffer if reader.cfg.shuffle else 0
        self.epoch = epoch
        self.unit_pos = 0  # index into this reader's units of the epoch
        self.in_unit = 0  # raw samples taken from that unit
        self.n = 0  # usable samples this epoch
        self.empty = 0  # epochs in a row without a usable sample
        self.buf: list[Sample] = []
        self.flush: Optional[list[Sample]] = None  # end of epoch: the buffer, shuffled, being handed out
        self._units: Optional[list[Unit]] = None
        self._it: Optional[Iterator[dict[str, Any]]] = None
        if reader.cfg.epochs is not None and epoch >= reader.cfg.epochs:
            raise _Exhausted

    def units(self) -> list[Unit]:
        if self._units is None:
            self._units = self.r._epoch_units(self.s, self.epoch)
        return self._units

    def _next_raw(self) -> Optional[tuple[dict[str, Any], tuple[int, int, int, int]]]:
        units = self.units()
        while self.unit_pos < len(units):
            count = units[self.unit_pos].count
            if self._it is None and count is not None and self.in_unit >= count:
                self.unit_pos, self.in_unit = self.unit_pos + 1, 0  # restored right after its last sample
                continue
            if self._it is None:
                self._it = iter_unit(self.r.sub_unit(units[self.unit_pos], self.in_unit))
            try:
                raw = next(self._it)
            except StopIteration:
                if units[self.unit_pos].count is None:
                    self.r._unindexed_done(units[self.unit_pos], self.in_unit)
                self._it, self.unit_pos, self.in_unit = None, self.unit_pos + 1, 0
                continue
            except TruncatedShard as e:
                unit, got = units[self.unit_pos], self.in_unit
                self._it, self.unit_pos, self.in_unit = None, self.unit_pos + 1, 0
                if unit.count is None:
                    self.r._unindexed_lost(unit, got, e)
                else:
                    self.r._count("read", e.missing)
                    self.r._bad("truncated_tar", e.url, "[rest of unit]", e.detail, n=e.missing)
                continue
            ref = (self.s, self.epoch, self.unit_pos, self.in_unit)
            self.in_unit += 1
            return raw, ref
        return None

    def _next_epoch(self) -> None:
        self.empty = self.empty + 1 if self.n == 0 else 0
        if self.empty >= self.r.cfg.max_empty_epochs:
            raise DataError(
                f"data: subset {self.name!r}: reader {self.r.consumer} (rank {self.r.plan.rank}) found no usable sample "
                f"in {self.empty} epochs in a row (counts: {self.r.state.counters}); check filters, buckets and shards"
            )
        self.epoch += 1
        self.unit_pos = self.in_unit = self.n = 0
        self.flush, self._units, self._it = None, None, None
        if self.r.cfg.epochs is not None and self.epoch >= self.r.cfg.epochs:
            raise _Exhausted

    def next(self) -> Sample:
        r = self.r
        while True:
            if self.flush is not None:
                if self.flush:
                    return self.flush.pop(0)
                self._next_epoch()
                continue
            got = self._next_raw()
            if got is None:  # end of the epoch's units: hand out the buffer in a seeded order
                order = _rng(r.plan.seed, 611953, self.s, self.epoch, r.consumer).permutation(len(self.buf))
                self.flush = [self.buf[i] for i in order]
                self.buf = []
                continue
            raw, ref = got
            smp = r._prepare(raw, self.s, self.epoch)
            if smp is None:
                continue
            smp.ref = ref
            self.n += 1
            if self.size <= 1:
                return smp
            if len(self.buf) < self.size:
                self.buf.append(smp)
                continue
            i = int(_rng(r.plan.seed, 104729, self.s, self.epoch, r.consumer, self.n).integers(len(self.buf)))
            out, self.buf[i] = self.buf[i], smp
            return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "unit_pos": self.unit_pos, "in_unit": self.in_unit, "n": self.n, "empty": self.empty,
            "buf": [list(x.ref) for x in self.buf],
            "flush": None if self.flush is None else [list(x.ref) for x in self.flush],
        }

    def restore(self, snap: dict[str, Any], samples: dict[tuple, Sample]) -> None:
        self.epoch, self.unit_pos, self.in_unit = int(snap["epoch"]), int(snap["unit_pos"]), int(snap["in_unit"])
        self.n, self.empty = int(snap["n"]), int(snap["empty"])
        self.buf = [samples[tuple(x)] for x in snap["buf"]]
        self.flush = None if snap["flush"] is None else [samples[tuple(x)] for x in snap["flush"]]
        self._units, self._it = None, None


class Reader:
    """The stream of one reader. ``batches()`` yields ``(batch_dict, snapshot)``.

    ``resume``: ``{"snapshot": <a snapshot this reader reported>}`` continues right after that batch;
    ``{"start_epochs": {subset: e}}`` starts fresh at those epochs (after a world-size/worker change).
    """

    def __init__(self, plan: Plan, worker: int, resume: Optional[dict] = None):
        self.plan = plan
        self.cfg = plan.cfg
        self.worker = worker
        self.consumer = plan.rank * plan.workers + worker
        self.state = ReaderState()
        self.resume = resume or {}
        self.start_epochs = dict(self.resume.get("start_epochs") or {})
        self._quiet = False
        self._logged: dict[str, int] = {}
        self.streams: list[_Stream] = []
        self.pending: dict[tuple[str, int], list[Sample]] = {}  # insertion order = flush order
        self.mix_draws = 0

    # ------------------------------------------------------------------ counting
    def _count(self, name: str, n: int = 1) -> None:
        if not self._quiet:
            self.state.counters[name] = self.state.counters.get(name, 0) + n

    def _bad(self, reason: str, url: str, key: str, detail: str = "", n: int = 1) -> None:
        if self._quiet:
            return
        self._count(f"skipped/{reason}", n)
        k = self._logged.get(reason, 0)
        if k < _MAX_LOGGED_PER_REASON:
            skip_log.info("data: skipped %s sample(s): %s shard=%s key=%s %s", n, reason, url, key, detail)
        elif k == _MAX_LOGGED_PER_REASON:
            skip_log.info("data: more %s samples skipped; not logging each any more (see metrics)", reason)
        self._logged[reason] = k + 1
        self._check_bad(url, key)

    # ------------------------------------------------------------------ shards without an index
    # How many samples an unreadable shard without an index lost is not written anywhere, so it is
    # estimated from the shards this reader read to the end: by bytes for local files (samples per byte),
    # by shard for pipes and URLs (samples per shard), less what was read before the failure, and at least
    # one per failed shard. The estimate is revised as more shards complete; every increase counts as
    # truncated_tar samples read and lost (so against data.max_bad_fraction).
    def _unindexed_done(self, unit: Unit, got: int) -> None:
        self._count("unindexed/shards_ok")
        self._count("unindexed/samples_ok", got)
        size = _local_size(unit.url)
        if size is not None:
            self._count("unindexed/bytes_ok", size)
            self._count("unindexed/samples_ok_local", got)
        self._recount_lost(unit.url, "revised with a shard read to its end")

    def _unindexed_lost(self, unit: Unit, got: int, e: TruncatedShard) -> None:
        size = _local_size(unit.url)
        if size is not None:
            self._count("unindexed/lost_bytes", size)
        else:
            self._count("unindexed/lost_remote")
        self._count("unindexed/lost_shards")
        self._count("unindexed/lost_got", got)
        self._recount_lost(unit.url, e.detail)

    def _lost_estimate(self) -> int:
        c = self.state.counters
        shards_ok, bytes_ok = c.get("unindexed/shards_ok", 0), c.get("unindexed/bytes_ok", 0)
        per_shard = c.get("unindexed/samples_ok", 0) / shards_ok if shards_ok else 0.0
        per_byte = c.get("unindexed/samples_ok_local", 0) / bytes_ok if bytes_ok else 0.0
        local_shards = c.get("unindexed/lost_shards", 0) - c.get("unindexed/lost_remote", 0)
        expected = (c.get("unindexed/lost_bytes", 0) * per_byte if per_byte else local_shards * per_shard)
        expected += c.get("unindexed/lost_remote", 0) * per_shard
        return max(c.get("unindexed/lost_shards", 0), round(expected) - c.get("unindexed/lost_got", 0))

    def _recount_lost(self, url: str, detail: str) -> None:
        if self._quiet or not self.state.counters.get("unindexed/lost_shards"):
            return
        more = self._lost_estimate() - self.state.counters.get("unindexed/lost_counted", 0)
        if more > 0:
            self._count("unindexed/lost_counted", more)
            self._count("read", more)
            self._bad("truncated_tar", url, "[shard without index, estimated]", detail, n=more)

    def _check_bad(self, url: str, key: str) -> None:
        c = self.state.counters
        bad = sum(c.get(f"skipped/{r}", 0) for r in BAD_REASONS)
        seen = c.get("read", 0) - sum(v for k, v in c.items() if k.startswith("filtered/"))
        if seen >= self.cfg.bad_min_samples and bad > self.cfg.max_bad_fraction * seen:
            detail = ", ".join(f"{r}: {c[f'skipped/{r}']}" for r in BAD_REASONS if c.get(f"skipped/{r}"))
            raise DataError(
                f"data: {bad} of {seen} samples read by reader {self.consumer} (rank {self.plan.rank}, worker "
                f"{self.worker}) were bad ({detail}), more than data.max_bad_fraction={self.cfg.max_bad_fraction}; "
                f"last bad: shard {url} key {key}. Fix or drop those shards, or raise data.max_bad_fraction."
            )

    # ------------------------------------------------------------------ units
    def _epoch_units(self, s: int, epoch: int) -> list[Unit]:
        units = self.plan.subsets[s].units
        if self.cfg.shuffle:
            order = _rng(self.plan.seed, 7919, s, epoch).permutation(len(units))
        else:
            order = np.arange(len(units))
        return [units[i] for i in order[self.consumer :: self.plan.readers]]

    def sub_unit(self, unit: Unit, skip: int) -> Unit:
        """The part of ``unit`` after its first ``skip`` samples (seeking when offsets are known)."""
        if skip == 0:
            return unit
        start = unit.start + skip
        count = None if unit.count is None else unit.count - skip
        offs = self.plan.offsets.get(unit.url)
        off = int(offs[start]) if offs is not None and start < len(offs) else 0
        return Unit(unit.url, start, count, off)

    def _prepare(self, raw: dict[str, Any], s: int, epoch: int) -> Optional[Sample]:
        """Parse + filter + bucket a raw sample without decoding its media; None when skipped."""
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        self._count("read")
        kind, ext = media_of(raw)
        if not kind:
            self._bad("missing_media", url, key, f"members: {sorted(k for k in raw if not k.startswith('__'))}")
            return None
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as e:
                self._bad("bad_metadata", url, key, str(e))
                return None
        caption = pick_caption(meta, self.plan.seed, epoch, key)
        if caption is None and "txt" in raw:
            caption = raw["txt"].decode("utf-8", "replace")
        if kind == "latent":
            if "text.npy" not in raw:
                self._bad("missing_text", url, key)
                return None
        elif not isinstance(caption, str) or not caption.strip():
            self._bad("missing_caption", url, key)
            return None
        # metadata filters (before any decoding)
        media = self.plan.subsets[s].filters.media
        if media and kind not in media:
            self._count("filtered/media")
            return None
        for name, mkey, lo, hi in self.plan.subsets[s].filters.checks():
            v = _number(meta, mkey)
            if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                self._count(f"filtered/{name}")
                return None
        if kind == "latent":
            b = meta.get("bucket")
            try:
                bi = self.plan.buckets.index(tuple(int(x) for x in b))  # type: ignore[union-attr]
            except (TypeError, ValueError):
                self._bad("bucket_mismatch", url, key, f"cached at bucket {b}, not in data.buckets")
                return None
        else:
            if kind == "video" and not all(_number(meta, k) for k in ("width", "height", "duration")):
                try:
                    meta.update({k: v for k, v in probe_video(raw[ext]).items() if k not in meta or _number(meta, k) is None})
                except DecodeError as e:
                    self._bad("undecodable", url, key, str(e))
                    return None
            if kind == "image" and not all(_number(meta, k) for k in ("width", "height")):
                try:
                    meta.update(probe_image(raw[ext]))
                except DecodeError as e:
                    self._bad("undecodable", url, key, str(e))
                    return None
            w, h = _number(meta, "width"), _number(meta, "height")
            if not w or not h or w <= 0 or h <= 0:
                self._bad("bad_metadata", url, key, f"width/height {w}/{h}")
                return None
            avail = 1 if kind == "image" else available_frames(_number(meta, "duration") or 0.0, self.cfg.fps)
            bi = assign_bucket(self.plan.buckets, int(w), int(h), avail, kind == "image", self.cfg.video_in_image_buckets)
            if bi is None:
                self._bad("too_short", url, key, f"{avail} frames at {self.cfg.fps} fps")
                return None
        return Sample(key, url, s, epoch, kind, ext, raw, meta, bi, caption if isinstance(caption, str) else "")

    def iter_subset(self, s: int) -> Iterator[Sample]:
        """The planned samples of subset ``s`` alone (for ``lcv-data stats``)."""
        try:
            st = _Stream(self, s, int(self.start_epochs.get(self.plan.subsets[s].name, 0)))
            while True:
                yield st.next()
        except _Exhausted:
            return

    def plan_batches(self) -> Iterator[PlannedBatch]:
        cfg = self.cfg
        if not self.streams:
            try:
                self.streams = [_Stream(self, s, int(self.start_epochs.get(sp.name, 0))) for s, sp in enumerate(self.plan.subsets)]
            except _Exhausted:
                return
        ratios = np.array([sp.ratio for sp in self.plan.subsets], dtype=np.float64)
        cum = np.cumsum(ratios / ratios.sum())
        while True:
            if len(self.streams) > 1:
                u = _rng(self.plan.seed, 15485863, self.consumer, self.mix_draws).random()
                s = int(np.searchsorted(cum, u, side="right").clip(0, len(self.streams) - 1))
            else:
                s = 0
            self.mix_draws += 1
            try:
                smp = self.streams[s].next()
            except _Exhausted:
                break  # finite epochs: the first exhausted subset ends the stream
            bk = ("latent" if smp.kind == "latent" else "pixel", smp.bucket)
            self.pending.setdefault(bk, []).append(smp)
            if len(self.pending[bk]) >= bucket_batch_size(cfg, smp.bucket):
                yield self._emit(bk, self.pending.pop(bk))
        while self.pending:  # finite mode only: partial batches, so every sample is seen
            bk = next(iter(self.pending))
            yield self._emit(bk, self.pending.pop(bk))

    def _emit(self, bk: tuple[str, int], samples: list[Sample]) -> PlannedBatch:
        b = self.plan.buckets[bk[1]]
        if bk[0] == "latent":
            t = int(samples[0].meta.get("latent_shape", [0, 1])[1])
        else:
            t = latent_frames(b[0], self.cfg.temporal_stride)
        task, k = sample_task(_rng(self.plan.seed, 32452843, self.consumer, self.state.planned), self.cfg, t)
        self.state.planned += 1
        return PlannedBatch(bk[1], bk[0], samples, task, k)

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "planned": self.state.planned,
            "mix_draws": self.mix_draws,
            "counters": dict(self.state.counters),
            "epochs": {st.name: st.epoch for st in self.streams},
            "streams": [st.snapshot() for st in self.streams],
            "pending": [[k, b, [list(x.ref) for x in v]] for (k, b), v in self.pending.items()],
        }

    def _fetch(self, refs: list[tuple[int, int, int, int]]) -> dict[tuple, Sample]:
        """Re-read (never decode) the referenced samples; one seek each when offsets are known."""
        out: dict[tuple, Sample] = {}
        groups: dict[tuple[int, int, int], list[int]] = {}
        for ref in refs:
            groups.setdefault(tuple(ref[:3]), []).append(ref[3])  # type: ignore[arg-type]
        self._quiet = True
        try:
            for (s, epoch, pos), idxs in groups.items():
                unit = self._epoch_units(s, epoch)[pos]
                want = sorted(set(idxs))
                if unit.url in self.plan.offsets:
                    raws = {i: _read_one(self.sub_unit(unit, i)) for i in want}
                else:
                    raws, top = {}, want[-1]
                    for i, raw in enumerate(iter_unit(unit)):
                        if i in idxs:
                            raws[i] = raw
                        if i >= top:
                            break
                for i in want:
                    smp = self._prepare(raws[i], s, epoch) if raws.get(i) is not None else None
                    if smp is None:
                        raise DataError(f"data: cannot restore the loader: sample {i} of unit {unit} changed since the checkpoint")
                    smp.ref = (s, epoch, pos, i)
                    out[smp.ref] = smp
        except TruncatedShard as e:
            raise DataError(f"data: cannot restore the loader: {e}") from e
        finally:
            self._quiet = False
        return out

    def restore(self, snap: dict[str, Any]) -> None:
        refs = [tuple(x) for st in snap["streams"] for x in st["buf"] + (st["flush"] or [])]
        refs += [tuple(x) for _, _, v in snap["pending"] for x in v]
        samples = self._fetch(refs)  # type: ignore[arg-type]
        self.streams = []
        for s, st in enumerate(snap["streams"]):
            stream = _Stream.__new__(_Stream)
            stream.r, stream.s, stream.name = self, s, self.plan.subsets[s].name
            stream.size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
            stream.restore(st, samples)
            self.streams.append(stream)
        self.pending = {(k, int(b)): [samples[tuple(x)] for x in v] for k, b, v in snap["pending"]}
        self.mix_draws = int(snap["mix_draws"])
        self.state.planned = int(snap["planned"])
        self.state.counters = dict(snap["counters"])

    # ------------------------------------------------------------------ materialising
    def _start_time(self, smp: Sample, frames: int) -> float:
        duration = _number(smp.meta, "duration") or 0.0
        room = duration - frames / self.cfg.fps
        if room <= 0:
            return 0.0
        return float(_rng(self.plan.seed, 86028121, smp.epoch, _key_hash(smp.key)).random() * room)

    def _materialise(self, pb: PlannedBatch) -> Optional[dict[str, Any]]:
        f, h, w = self.plan.buckets[pb.bucket]
        kept: list[Sample] = []
        if pb.kind == "latent":
            lats: list[np.ndarray] = []
            texts: list[np.ndarray] = []
            for smp in pb.samples:
                try:
                    lat = np.load(io.BytesIO(smp.raw[smp.ext]), allow_pickle=False)
                    txt = np.load(io.BytesIO(smp.raw["text.npy"]), allow_pickle=False)
                    if lats and lat.shape != lats[0].shape:
                        raise DecodeError(f"latent shape {lat.shape} != {lats[0].shape} in the same bucket")
                    if txt.ndim != 2:
                        raise DecodeError(f"text embedding has shape {txt.shape}, expected [L, D]")
                except (DecodeError, ValueError, OSError, EOFError) as e:
                    self._bad("undecodable", smp.url, smp.key, str(e))
                    continue
                lats.append(lat)
                texts.append(txt)
                kept.append(smp)
                self._count("good")
            if not kept:
                return None
            batch: dict[str, Any] = {"latents": _stack_float(lats)}
            L = max(t.shape[0] for t in texts)
            L = max([L] + [int(smp.meta.get("text_length", 0)) for smp in kept])  # the encoder's padded length
            text = _empty_shared((len(texts), L, texts[0].shape[1]))
            text.zero_()
            mask = torch.zeros((len(texts), L), dtype=torch.bool)
            for i, t in enumerate(texts):
                text[i, : t.shape[0]] = torch.from_numpy(t)
                mask[i, : t.shape[0]] = True
            batch["text"] = text
            batch["text_mask"] = mask
        else:
            # Frames go straight from the decoder into the uint8 batch tensor (allocated in shared memory
            # when in a worker, so handing it to the trainer copies nothing); the consumer converts them to
            # [-1, 1] on its device (``video_to_float``).
            video = _empty_shared((len(pb.samples), 3, f, h, w), torch.uint8)

            for smp in pb.samples:
                slot = video[len(kept)]

                def sink(j: int, arr: np.ndarray, slot=slot) -> None:
                    slot[:, j].copy_(torch.from_numpy(arr).permute(2, 0, 1))

                try:
                    if smp.kind == "image":
                        sink(0, decode_image(smp.raw[smp.ext], h, w)[0])
                    else:
                        decode_video(smp.raw[smp.ext], f, h, w, self.cfg.fps, self._start_time(smp, f), sink=sink)
                except (DecodeError, ValueError, OSError, EOFError) as e:
                    self._bad("undecodable", smp.url, smp.key, str(e))
                    continue
                kept.append(smp)
                self._count("good")
            if not kept:
                return None
            batch = {"video": video[: len(kept)] if len(kept) < len(pb.samples) else video}
            batch["caption"] = [smp.caption for smp in kept]
        batch["num_cond_latents"] = int(pb.num_cond_latents)
        batch["task"] = pb.task
        batch["bucket"] = (f, h, w)
        batch["keys"] = [smp.key for smp in kept]
        batch["subset"] = [self.plan.subsets[smp.subset].name for smp in kept]
        if self.plan.with_meta:
            batch["meta"] = [smp.meta for smp in kept]
        return batch

    def batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        if self.resume.get("snapshot"):
            self.restore(self.resume["snapshot"])
        for pb in self.plan_batches():
            batch = self._materialise(pb)
            if batch is not None:
                yield batch, self.snapshot()
        # Finite streams only: a last (None, snapshot) so the counts of a trailing all-bad batch arrive.
        yield None, self.snapshot()  # type: ignore[misc]
