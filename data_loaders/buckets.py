"""Frame-size buckets: which (frames, height, width) a sample goes to, and task sampling per batch."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from data_loaders.config import TASKS, DataConfig, latent_frames

Bucket = tuple[int, int, int]


def assign_bucket(
    buckets: Sequence[Bucket],
    width: int,
    height: int,
    frames_available: int,
    is_image: bool,
    video_in_image_buckets: bool = False,
) -> Optional[int]:
    """Index of the bucket for a sample, or None when no bucket fits (the sample is too short).

    Images go to 1-frame buckets only; videos to buckets of more than one frame (and to 1-frame buckets
    too when ``video_in_image_buckets``) whose frame count the clip covers at the target fps. Among
    those, the closest aspect ratio (|log ratio|) wins, then the most frames, then the most pixels.
    """
    ar = width / height
    best, best_key = None, None
    for i, (f, h, w) in enumerate(buckets):
        if is_image:
            if f != 1:
                continue
        else:
            if f == 1 and not video_in_image_buckets:
                continue
            if f > frames_available:
                continue
        key = (round(abs(math.log((w / h) / ar)), 6), -f, -h * w)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def task_probs(cfg: DataConfig) -> tuple[list[str], np.ndarray]:
    names = [t for t in TASKS if cfg.tasks.get(t, 0) > 0]
    p = np.array([float(cfg.tasks[t]) for t in names])
    return names, p / p.sum()


def sample_task(rng: np.random.Generator, cfg: DataConfig, num_latent_frames: int) -> tuple[str, int]:
    """(task, num_cond_latents) for one batch.

    T2V has 0 condition latents, I2V 1, VC k drawn uniformly from ``vc_cond_latents`` clipped so at
    least one latent frame stays noisy. A bucket of one latent frame (images) is always T2V; a task
    that cannot fit the bucket falls back to T2V. Random numbers are drawn the same way on every path
    so the stream stays reproducible.
    """
    names, p = task_probs(cfg)
    u = rng.random()
    k_u = rng.random()
    task = names[int(np.searchsorted(np.cumsum(p), u, side="right").clip(0, len(names) - 1))]
    if num_latent_frames <= 1 or task == "t2v":
        return "t2v", 0
    if task == "i2v":
        return "i2v", 1
    lo, hi = int(cfg.vc_cond_latents[0]), min(int(cfg.vc_cond_latents[1]), num_latent_frames - 1)
    if lo > hi:
        return "t2v", 0
    return "vc", lo + int(k_u * (hi - lo + 1))


def bucket_latent_frames(bucket: Bucket, cfg: DataConfig) -> int:
    return latent_frames(bucket[0], cfg.temporal_stride)


def bucket_name(bucket: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in bucket)
