"""Helpers for the data tests: tiny real clips (mp4 through PyAV) and hand-made shard sets."""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from data_loaders import DataConfig
from data_loaders.decode import encode_jpg, encode_mp4
from data_loaders.shards import ShardSetWriter


def ramp_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frame i is a flat grey of value 8 + 12*i (so the decoded frame index is readable)."""
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        out[i] = min(255, 8 + 12 * i)
    return out


def video_sample(key: str, frames: int = 9, height: int = 32, width: int = 32, fps: float = 8.0, caption: str | None = "a clip",
                 **meta: Any) -> dict[str, Any]:
    m = {"key": key, "width": width, "height": height, "fps": fps, "num_frames": frames, "duration": frames / fps, **meta}
    if caption is not None:
        m["caption"] = caption
    return {"__key__": key, "mp4": encode_mp4(ramp_clip(frames, height, width), fps), "json": m}


def image_sample(key: str, height: int = 32, width: int = 32, caption: str = "an image", **meta: Any) -> dict[str, Any]:
    img = np.full((height, width, 3), 128, np.uint8)
    return {"__key__": key, "jpg": encode_jpg(img), "json": {"key": key, "width": width, "height": height, "caption": caption, **meta}}


def write_set(out_dir: str, samples: Iterable[dict[str, Any]], per_shard: int = 8) -> str:
    w = ShardSetWriter(out_dir, "pixel", max_count=per_shard)
    for s in samples:
        w.write(s)
    w.finish()
    return out_dir


def truncate(path: str, keep_fraction: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def all_keys(out_dir: str) -> set[str]:
    import json

    with open(os.path.join(out_dir, "index.json")) as f:
        index = json.load(f)
    import tarfile

    keys = set()
    for s in index["shards"]:
        with tarfile.open(os.path.join(out_dir, s["path"])) as tf:
            for m in tf:
                keys.add(m.name.split(".", 1)[0])
    return keys


def small_config(shards: str, **kw: Any) -> DataConfig:
    """A one-epoch, single-process loader config on the kit's 9x32x32 clips that tolerates bad samples."""
    base = dict(shards=[shards], buckets=[[9, 32, 32]], batch_size=2, num_workers=0, epochs=1, max_bad_fraction=0.9,
                bad_min_samples=1)
    base.update(kw)
    return DataConfig(**base)
