"""Parallelism for lcv-train: the layout (``ParallelDims``), turning a plain model into a distributed one
(``parallelize_model``), training engines, and context parallelism. Never imported by ``lcv_train.model``."""

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, init_distributed
from parallel.engine import TorchEngine, build_engine
from parallel.parallelize import parallelize_model

__all__ = ["ParallelConfig", "ParallelDims", "TorchEngine", "build_engine", "init_distributed", "parallelize_model"]
