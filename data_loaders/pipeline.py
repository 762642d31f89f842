"""One reader's deterministic stream: units -> samples -> filters -> buckets -> batches.

A *reader* is one dataloader worker of one rank (``consumer = rank * W + worker``; ``C = world * W``
readers in all). For subset s and epoch e every reader computes the same permutation of the subset's
units (seeded by ``(seed, s, e)``) and takes ``units[consumer::C]``: every sample is read by exactly one
reader per epoch. Everything a reader does is a pure function of (config, seed, rank, worker) and the
bytes it reads, so its stream can be re-played.

Work is split in two phases. *Planning* reads raw samples, parses the ``.json``, applies filters,
assigns buckets, shuffles (buffer), mixes subsets and groups samples into planned batches and tasks;
it never decodes media. *Materialising* decodes the planned batch. On resume a reader re-plans its
first ``planned`` batches without materialising them (cheap skip) and then carries on. A sample that
fails to decode is dropped from its batch (the batch is one smaller; a batch with nothing left is not
emitted but still counts as planned), so batch boundaries never depend on decoding.
"""

from __future__ import annotations

import io
import json
import logging
import math
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


def _empty_float(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor; in a DataLoader worker it lives in shared memory (passing it on copies nothing)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    n = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(n * 4)  # what torch's default_collate does too
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
    except (AttributeError, RuntimeError):  # pragma: no cover - older/other torch builds
        return torch.empty(shape, dtype=torch.float32)


def _stack_float(arrays: list[np.ndarray]) -> torch.Tensor:
    out = _empty_float((len(arrays),) + tuple(arrays[0].shape))
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


class Reader:
    """The stream of one reader. ``batches()`` yields ``(batch_dict, info)``.

    ``resume``: ``{"planned": n, "counters": {...}}`` to skip the first n planned batches without
    decoding and then restore the counters; or ``{"start_epochs": {subset: e}}`` to start fresh at
    those epochs (used when the world size or worker count changed).
    """

    def __init__(self, plan: Plan, worker: int, resume: Optional[dict] = None):
        self.plan = plan
        self.cfg = plan.cfg
        self.worker = worker
        self.consumer = plan.rank * plan.workers + worker
        self.state = ReaderState()
        self.resume = resume or {}
        self.replay_until = int(self.resume.get("planned", 0))
        self.start_epochs = dict(self.resume.get("start_epochs", {}))
        self._logged: dict[str, int] = {}

    # ------------------------------------------------------------------ counting
    @property
    def replaying(self) -> bool:
        return self.state.planned < self.replay_until

    def _count(self, name: str, n: int = 1) -> None:
        self.state.counters[name] = self.state.counters.get(name, 0) + n

    def _bad(self, reason: str, url: str, key: str, detail: str = "", n: int = 1) -> None:
        self._count(f"skipped/{reason}", n)
        if self.replaying:
            return
        k = self._logged.get(reason, 0)
        if k < _MAX_LOGGED_PER_REASON:
            log.warning("data: skipped %s sample(s): %s shard=%s key=%s %s", n, reason, url, key, detail)
        elif k == _MAX_LOGGED_PER_REASON:
            log.warning("data: more %s samples skipped; not logging each any more (see metrics)", reason)
        self._logged[reason] = k + 1
        self._check_bad(url, key)

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

    # ------------------------------------------------------------------ planning
    def _epoch_units(self, s: int, epoch: int) -> list[Unit]:
        units = self.plan.subsets[s].units
        if self.cfg.shuffle:
            order = _rng(self.plan.seed, 7919, s, epoch).permutation(len(units))
        else:
            order = np.arange(len(units))
        return [units[i] for i in order[self.consumer :: self.plan.readers]]

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
        caption = meta.get("caption")
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

    def _subset_stream(self, s: int) -> Iterator[Sample]:
        name = self.plan.subsets[s].name
        epoch = int(self.start_epochs.get(name, 0))
        empty = 0
        while self.cfg.epochs is None or epoch < self.cfg.epochs:
            self.state.epochs[name] = epoch
            rng = _rng(self.plan.seed, 104729, s, epoch, self.consumer)
            buf: list[Sample] = []
            size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
            n = 0
            for unit in self._epoch_units(s, epoch):
                try:
                    for raw in iter_unit(unit):
                        smp = self._prepare(raw, s, epoch)
                        if smp is None:
                            continue
                        n += 1
                        if size <= 1:
                            yield smp
                        elif len(buf) < size:
                            buf.append(smp)
                        else:
                            i = int(rng.integers(len(buf)))
                            out, buf[i] = buf[i], smp
                            yield out
                except TruncatedShard as e:
                    self._count("read", e.missing)
                    self._bad("truncated_tar", e.url, f"[{unit.start}+]", e.detail, n=e.missing)
            if size > 1:
                rng.shuffle(buf)  # type: ignore[arg-type]
            yield from buf
            empty = empty + 1 if n == 0 else 0
            if empty >= self.cfg.max_empty_epochs:
                raise DataError(
                    f"data: subset {name!r}: reader {self.consumer} (rank {self.plan.rank}) found no usable sample in "
                    f"{empty} epochs in a row (counts: {self.state.counters}); check filters, buckets and shards"
                )
            epoch += 1

    def plan_batches(self) -> Iterator[PlannedBatch]:
        cfg = self.cfg
        streams = [self._subset_stream(s) for s in range(len(self.plan.subsets))]
        ratios = np.array([sp.ratio for sp in self.plan.subsets], dtype=np.float64)
        cum = np.cumsum(ratios / ratios.sum())
        mix_rng = _rng(self.plan.seed, 15485863, self.consumer)
        task_rng = _rng(self.plan.seed, 32452843, self.consumer)
        pending: dict[tuple[str, int], list[Sample]] = {}
        order: list[tuple[str, int]] = []  # first-seen order of pending buckets, for a deterministic flush

        def emit(bk: tuple[str, int], samples: list[Sample]) -> PlannedBatch:
            b = self.plan.buckets[bk[1]]
            if bk[0] == "latent":
                t = int(samples[0].meta.get("latent_shape", [0, 1])[1])
            else:
                t = latent_frames(b[0], cfg.temporal_stride)
            task, k = sample_task(task_rng, cfg, t)
            self.state.planned += 1
            return PlannedBatch(bk[1], bk[0], samples, task, k)

        while True:
            u = mix_rng.random()
            s = int(np.searchsorted(cum, u, side="right").clip(0, len(streams) - 1)) if len(streams) > 1 else 0
            try:
                smp = next(streams[s])
            except StopIteration:
                break  # finite epochs: the first exhausted subset ends the stream
            bk = ("latent" if smp.kind == "latent" else "pixel", smp.bucket)
            if bk not in pending:
                pending[bk] = []
                order.append(bk)
            pending[bk].append(smp)
            if len(pending[bk]) >= bucket_batch_size(cfg, smp.bucket):
                samples = pending.pop(bk)
                order.remove(bk)
                yield emit(bk, samples)
        for bk in order:  # finite mode only: partial batches, so every sample is seen
            yield emit(bk, pending[bk])

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
            text = _empty_float((len(texts), L, texts[0].shape[1]))
            text.zero_()
            mask = torch.zeros((len(texts), L), dtype=torch.bool)
            for i, t in enumerate(texts):
                text[i, : t.shape[0]] = torch.from_numpy(t)
                mask[i, : t.shape[0]] = True
            batch["text"] = text
            batch["text_mask"] = mask
        else:
            # Frames go straight from the decoder into the batch tensor (allocated in shared memory when
            # in a worker, so handing it to the trainer copies nothing), normalised to [-1, 1] per frame.
            video = _empty_float((len(pb.samples), 3, f, h, w))

            for smp in pb.samples:
                slot = video[len(kept)]

                def sink(j: int, arr: np.ndarray, slot=slot) -> None:
                    dst = slot[:, j]
                    dst.copy_(torch.from_numpy(arr).permute(2, 0, 1))
                    dst.mul_(1.0 / 127.5).sub_(1.0)

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

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "planned": self.state.planned,
            "counters": dict(self.state.counters),
            "epochs": dict(self.state.epochs),
        }

    def batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        restore = self.resume.get("counters") if self.replay_until > 0 else None
        for pb in self.plan_batches():
            if self.state.planned <= self.replay_until:
                if self.state.planned == self.replay_until and restore is not None:
                    self.state.counters = dict(restore)
                continue
            batch = self._materialise(pb)
            if batch is not None:
                yield batch, self.info()
