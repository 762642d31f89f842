"""``ParallelDims``: the one object that owns the parallel layout and the device mesh.

World = dp_replicate x dp_shard x cp x tp. Everything else asks this object for ranks and groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lcv_train.errors import ConfigError
from parallel.config import ParallelConfig


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int = 0, local_rank: int = 0) -> "ParallelDims":
        cfg.validate()
        rest = cfg.dp_replicate * cfg.cp * cfg.tp
        if world_size % rest:
            raise ConfigError(f"parallel: dp_replicate*cp*tp = {cfg.dp_replicate}*{cfg.cp}*{cfg.tp} = {rest} "
                              f"does not divide the world size {world_size}")
        dp_shard = world_size // rest if cfg.dp_shard == -1 else cfg.dp_shard
        if cfg.dp_replicate * dp_shard * cfg.cp * cfg.tp != world_size:
            raise ConfigError(f"parallel: dp_replicate*dp_shard*cp*tp = {cfg.dp_replicate}*{dp_shard}*{cfg.cp}*{cfg.tp}"
                              f" != world size {world_size}")
        return cls(cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp, world_size, rank, local_rank)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Rank among the data-parallel replicas: ranks that differ only in cp/tp see the same data."""
        if self.mesh is None:
            return 0
        names = self.mesh.mesh_dim_names
        r = 0
        for name in ("dp_replicate", "dp_shard"):
            if name in names:
                r = r * self.mesh.size(names.index(name)) + self.mesh.get_local_rank(name)
        return r

    def build_mesh(self, device_type: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.dp_replicate, self.dp_shard, self.cp, self.tp)
        names = ("dp_replicate", "dp_shard", "cp", "tp")
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)


def init_distributed(cfg: ParallelConfig) -> ParallelDims:
    """Initialise the process group from the torchrun environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims.from_config(cfg, world, rank, local_rank)
    if torch.cuda.is_available():
        dims.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(dims.device)
    if world > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        dims.build_mesh(dims.device.type)
    return dims
