"""Parallelism for lcv-train. Never imported by ``lcv_train.model``.

- ``ParallelConfig`` (``conf/parallel/*.yaml``: single, fsdp, hsdp, zero2, zero3, fsdp_cp4, fsdp_tp2) and
  ``ParallelDims``: the layout dp_replicate x dp_shard x cp x tp and its device mesh (``init_distributed``).
- ``parallelize_model``: TP (megatron-core, ``tensor_parallel.py``) -> CP (``context_parallel/``) ->
  activation checkpointing -> compile -> FSDP2/HSDP (``fsdp.py``), in that order, on the plain DiT.
- ``build_engine``: ``TorchEngine`` (single process, FSDP2, TP) or ``ZeroEngine`` (DeepSpeed ZeRO-2/3,
  ``zero.py``), one interface: ``autocast / backward / step / state_dict / load_state_dict``.
- ``planner.py`` (``lcv-plan``): per-GPU memory and step FLOPs of a layout; ``device_info.py``: peak FLOP/s.
"""

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, init_distributed
from parallel.engine import TorchEngine, build_engine
from parallel.parallelize import parallelize_model

__all__ = ["ParallelConfig", "ParallelDims", "TorchEngine", "build_engine", "init_distributed", "parallelize_model"]
