"""Data loading for lcv-train: WebDataset shards -> bucketed, task-sampled batches, resumable.

    from data_loaders import DataConfig, build_loader
    loader = build_loader(cfg, rank, world_size, seed)   # infinite iterable of batch dicts
    batch = next(iter(loader)); sd = loader.state_dict(); loader.load_state_dict(sd); loader.metrics()

See ``data_loaders/README.md`` for the shard format, the batch format and the resume contract.
This package never imports ``lcv_train`` at import time.
"""

from data_loaders.buckets import assign_bucket, sample_task
from data_loaders.config import (
    DataConfig,
    DataConfigError,
    DataError,
    FilterConfig,
    SubsetConfig,
    latent_frames,
    to_data_config,
    validate,
)
from data_loaders.decode import video_to_float
from data_loaders.loader import VideoLoader, build_loader
from data_loaders.synthetic import ensure_synthetic_shards

__all__ = [
    "DataConfig",
    "DataConfigError",
    "DataError",
    "FilterConfig",
    "SubsetConfig",
    "VideoLoader",
    "assign_bucket",
    "build_loader",
    "ensure_synthetic_shards",
    "latent_frames",
    "sample_task",
    "to_data_config",
    "validate",
    "video_to_float",
]
