"""The data configuration: one dataclass tree (usable as a Hydra structured config) and its validation.

Everything the loader reads from config is validated once, in :func:`validate`, with an error that
names the key (``data.buckets[2]: height 30 is not a multiple of 16``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from conf.parsing import ConfigError, from_mapping

TASKS = ("t2v", "i2v", "vc")


class DataConfigError(ConfigError):
    """A data configuration value is wrong; the message names the key and the constraint."""


class DataError(RuntimeError):
    """The data itself is unusable (too many bad samples, nothing left after filters, missing index)."""


def latent_frames(num_frames: int, temporal_stride: int) -> int:
    """Number of latent frames a causal video VAE makes of ``num_frames`` pixel frames.

    Wan 2.1 (stride 4): ``1 + (F - 1) // 4`` (93 -> 24, 1 -> 1); the tiny demo codec (stride 1): F.
    """
    if num_frames < 1 or temporal_stride < 1:
        raise ValueError(f"latent_frames: need num_frames >= 1 and temporal_stride >= 1, got {num_frames}, {temporal_stride}")
    return 1 + (num_frames - 1) // temporal_stride


@dataclass
class FilterConfig:
    """Metadata filters, applied to a sample's ``.json`` before anything is decoded.

    A filter on a key the sample's metadata lacks rejects the sample (it cannot prove it passes).
    ``ranges`` covers any other numeric key: ``{blur: [null, 0.3], bitrate: [500000, null]}``.
    """

    min_aesthetic: Optional[float] = None
    max_text_coverage: Optional[float] = None
    min_motion: Optional[float] = None
    max_motion: Optional[float] = None
    min_height: Optional[int] = None
    min_width: Optional[int] = None
    min_duration: Optional[float] = None
    max_duration: Optional[float] = None
    ranges: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    media: List[str] = field(default_factory=list)  # keep only these kinds: video, image, latent ([] = all)

    def checks(self) -> list[tuple[str, str, Optional[float], Optional[float]]]:
        """(filter name, metadata key, low, high) for every active filter."""
        out: list[tuple[str, str, Optional[float], Optional[float]]] = []
        pairs = [
            ("min_aesthetic", "aesthetic", self.min_aesthetic, None),
            ("max_text_coverage", "text_coverage", None, self.max_text_coverage),
            ("min_motion", "motion", self.min_motion, None),
            ("max_motion", "motion", None, self.max_motion),
            ("min_height", "height", self.min_height, None),
            ("min_width", "width", self.min_width, None),
            ("min_duration", "duration", self.min_duration, None),
            ("max_duration", "duration", None, self.max_duration),
        ]
        for name, key, lo, hi in pairs:
            if lo is not None or hi is not None:
                out.append((name, key, lo, hi))
        for key, (lo, hi) in (self.ranges or {}).items():
            out.append((f"range_{key}", key, lo, hi))
        return out


@dataclass
class SubsetConfig:
    """A named part of the mixture: its shards, its share of samples and its filters."""

    shards: List[str] = field(default_factory=list)
    ratio: float = 1.0
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class DataConfig:
    """Where the data is and how it becomes batches. See ``data_loaders/README.md``.

    ``shards`` (with ``filters``) is shorthand for one subset called ``default``; use ``subsets`` for
    a mixture. A shard entry is a directory holding ``index.json`` (what ``lcv-data pack/synth/encode``
    write), the URL of such an index file, or a WebDataset shard URL/brace pattern/``pipe:`` command
    (then each tar is one reading unit and sample counts are unknown).
    """

    shards: List[str] = field(default_factory=list)
    filters: FilterConfig = field(default_factory=FilterConfig)
    subsets: Dict[str, SubsetConfig] = field(default_factory=dict)
    # Frame-size buckets (frames, height, width) in pixels; every batch comes from one bucket.
    buckets: List[List[int]] = field(default_factory=lambda: [[9, 32, 32], [1, 32, 32]])
    batch_size: int = 8  # per rank
    batch_sizes: List[int] = field(default_factory=list)  # optional, one per bucket
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False  # page-lock batches in the loader (faster host->GPU copies; costs a copy)
    worker_timeout_s: float = 0.0  # > 0: raise if a worker produces nothing for this long (stuck storage)
    fps: float = 8.0
    temporal_stride: int = 4  # pixel frames per latent frame (Wan VAE 4; tiny demo codec 1)
    spatial_multiple: int = 16  # bucket height/width must be multiples (VAE 8 x patch 2)
    video_in_image_buckets: bool = False  # may a video be cut to one frame for a 1-frame bucket?
    tasks: Dict[str, float] = field(default_factory=lambda: {"t2v": 1.0, "i2v": 0.0, "vc": 0.0})
    vc_cond_latents: List[int] = field(default_factory=lambda: [1, 3])  # inclusive range
    shuffle: bool = True
    shuffle_buffer: int = 64  # samples per reader; 0 = no sample-level shuffle
    units_per_reader: int = 4  # shards are cut into about this many reading units per reader
    epochs: Optional[int] = None  # None: infinite (training); n: stop after n epochs (eval, encode)
    max_bad_fraction: float = 0.2
    bad_min_samples: int = 50  # the bad fraction is only judged after this many samples per reader
    max_empty_epochs: int = 3  # a reader that finds nothing usable this many epochs in a row stops


def _err(key: str, msg: str) -> DataConfigError:
    return DataConfigError(f"{key}: {msg}")


def to_data_config(cfg: Any) -> DataConfig:
    """Accept a DataConfig, an OmegaConf node or a plain dict; return a DataConfig (keys and value types
    checked by the one config parser, ``conf.parsing``; ranges by :func:`validate`)."""
    return from_mapping(DataConfig, cfg, "data", error=DataConfigError)


def _num(key: str, v: Any, lo: float | None = None, integer: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _err(key, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _err(key, f"must be finite, got {v!r}")
    if lo is not None and v < lo:
        raise _err(key, f"must be >= {lo}, got {v!r}")


def _validate_filters(f: FilterConfig, key: str) -> None:
    for fl in fields(FilterConfig):
        v = getattr(f, fl.name)
        if fl.name == "media":
            for i, m in enumerate(v or []):
                if m not in ("video", "image", "latent"):
                    raise _err(f"{key}.media[{i}]", f"unknown media {m!r} (video, image, latent)")
        elif fl.name == "ranges":
            for rk, rv in (v or {}).items():
                if not isinstance(rv, (list, tuple)) or len(rv) != 2:
                    raise _err(f"{key}.ranges.{rk}", f"expected [low, high] (null for open), got {rv!r}")
                for i, x in enumerate(rv):
                    if x is not None:
                        _num(f"{key}.ranges.{rk}[{i}]", x)
                if rv[0] is not None and rv[1] is not None and rv[0] > rv[1]:
                    raise _err(f"{key}.ranges.{rk}", f"low {rv[0]} > high {rv[1]}")
        elif v is not None:
            _num(f"{key}.{fl.name}", v)
    if f.min_motion is not None and f.max_motion is not None and f.min_motion > f.max_motion:
        raise _err(f"{key}.min_motion", f"{f.min_motion} > max_motion {f.max_motion}")
    if f.min_duration is not None and f.max_duration is not None and f.min_duration > f.max_duration:
        raise _err(f"{key}.min_duration", f"{f.min_duration} > max_duration {f.max_duration}")


def validate(cfg: DataConfig, root: str = "data") -> DataConfig:
    """Check every value; raise :class:`DataConfigError` naming the key. Returns ``cfg``."""
    if not is_dataclass(cfg):
        raise DataConfigError(f"{root}: expected a DataConfig")
    _num(f"{root}.temporal_stride", cfg.temporal_stride, 1, integer=True)
    _num(f"{root}.spatial_multiple", cfg.spatial_multiple, 1, integer=True)
    if not cfg.buckets:
        raise _err(f"{root}.buckets", "at least one (frames, height, width) bucket is needed")
    seen = set()
    for i, b in enumerate(cfg.buckets):
        key = f"{root}.buckets[{i}]"
        if not isinstance(b, (list, tuple)) or len(b) != 3:
            raise _err(key, f"expected [frames, height, width], got {b!r}")
        for name, v in zip(("frames", "height", "width"), b):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _err(key, f"{name} must be a positive integer, got {v!r}")
        f, h, w = b
        for name, v in (("height", h), ("width", w)):
            if v % cfg.spatial_multiple:
                raise _err(key, f"{name} {v} is not a multiple of {cfg.spatial_multiple} (data.spatial_multiple)")
        if (f - 1) % cfg.temporal_stride:
            raise _err(
                key,
                f"frames {f} is not 1 + a multiple of temporal_stride {cfg.temporal_stride} "
                f"(the VAE keeps 1 + (F-1)//{cfg.temporal_stride} latent frames)",
            )
        if tuple(b) in seen:
            raise _err(key, f"duplicate bucket {list(b)}")
        seen.add(tuple(b))
    _num(f"{root}.batch_size", cfg.batch_size, 1, integer=True)
    if cfg.batch_sizes:
        if len(cfg.batch_sizes) != len(cfg.buckets):
            raise _err(f"{root}.batch_sizes", f"needs one entry per bucket ({len(cfg.buckets)}), got {len(cfg.batch_sizes)} (after "
                       f"changing data.buckets, give data.batch_sizes one per bucket, or data.batch_sizes=[] to "
                       f"use data.batch_size for every bucket)")
        for i, v in enumerate(cfg.batch_sizes):
            _num(f"{root}.batch_sizes[{i}]", v, 1, integer=True)
    _num(f"{root}.num_workers", cfg.num_workers, 0, integer=True)
    _num(f"{root}.prefetch_factor", cfg.prefetch_factor, 1, integer=True)
    _num(f"{root}.worker_timeout_s", cfg.worker_timeout_s, 0)
    _num(f"{root}.fps", cfg.fps)
    if cfg.fps <= 0:
        raise _err(f"{root}.fps", f"must be > 0, got {cfg.fps}")
    if not cfg.tasks:
        raise _err(f"{root}.tasks", "give at least one task probability (t2v, i2v, vc)")
    for k, v in cfg.tasks.items():
        if k not in TASKS:
            raise _err(f"{root}.tasks.{k}", f"unknown task (known: {', '.join(TASKS)})")
        _num(f"{root}.tasks.{k}", v, 0)
    if sum(cfg.tasks.values()) <= 0:
        raise _err(f"{root}.tasks", "probabilities sum to 0")
    vc = cfg.vc_cond_latents
    if not isinstance(vc, (list, tuple)) or len(vc) != 2:
        raise _err(f"{root}.vc_cond_latents", f"expected [min, max] condition latent frames, got {vc!r}")
    for i, v in enumerate(vc):
        _num(f"{root}.vc_cond_latents[{i}]", v, 1, integer=True)
    if vc[0] > vc[1]:
        raise _err(f"{root}.vc_cond_latents", f"min {vc[0]} > max {vc[1]}")
    if cfg.tasks.get("vc", 0) > 0:
        max_t = max(latent_frames(b[0], cfg.temporal_stride) for b in cfg.buckets)
        if vc[0] >= max_t:
            raise _err(
                f"{root}.vc_cond_latents",
                f"min {vc[0]} condition latents leaves no noisy frame in any bucket (most latent frames: {max_t})",
            )
    _num(f"{root}.shuffle_buffer", cfg.shuffle_buffer, 0, integer=True)
    _num(f"{root}.units_per_reader", cfg.units_per_reader, 1, integer=True)
    if cfg.epochs is not None:
        _num(f"{root}.epochs", cfg.epochs, 1, integer=True)
    _num(f"{root}.max_bad_fraction", cfg.max_bad_fraction, 0)
    if cfg.max_bad_fraction > 1:
        raise _err(f"{root}.max_bad_fraction", f"must be in [0, 1], got {cfg.max_bad_fraction}")
    _num(f"{root}.bad_min_samples", cfg.bad_min_samples, 1, integer=True)
    _num(f"{root}.max_empty_epochs", cfg.max_empty_epochs, 1, integer=True)
    if cfg.shards and cfg.subsets:
        raise _err(f"{root}.shards", "give either shards (one subset) or subsets (a mixture), not both")
    if not cfg.shards and not cfg.subsets:
        raise _err(f"{root}.shards", "no data: set data.shards or data.subsets (try `lcv-data synth --out DIR`)")
    _validate_filters(cfg.filters, f"{root}.filters")
    for name, s in cfg.subsets.items():
        key = f"{root}.subsets.{name}"
        if not s.shards:
            raise _err(f"{key}.shards", "empty")
        _num(f"{key}.ratio", s.ratio, 0)
        if s.ratio <= 0:
            raise _err(f"{key}.ratio", f"must be > 0, got {s.ratio}")
        _validate_filters(s.filters, f"{key}.filters")
    for i, s in enumerate(cfg.shards):
        if not isinstance(s, str) or not s:
            raise _err(f"{root}.shards[{i}]", f"expected a path or URL, got {s!r}")
    return cfg


def subsets_of(cfg: DataConfig) -> dict[str, SubsetConfig]:
    """The mixture as name -> SubsetConfig (``shards`` becomes one subset named ``default``)."""
    if cfg.subsets:
        return dict(cfg.subsets)
    return {"default": SubsetConfig(shards=list(cfg.shards), ratio=1.0, filters=cfg.filters)}


def bucket_batch_size(cfg: DataConfig, bucket_index: int) -> int:
    return cfg.batch_sizes[bucket_index] if cfg.batch_sizes else cfg.batch_size
