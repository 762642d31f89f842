"""``ParallelDims``: the one object that owns the parallel layout and the device mesh.

World = dp_replicate x dp_shard x cp x tp, in that order on the mesh (tp innermost, so tensor-parallel
peers are neighbouring ranks, i.e. on the same node). Everything else asks this object for ranks, groups
and sub-meshes; nothing else computes a rank.

Mesh dims (always all four, size-1 dims included) plus flattened ones:

- ``"dp"``          = dp_replicate x dp_shard: ranks that see different data.
- ``"dp_shard_cp"`` = dp_shard x cp: what FSDP2 shards parameters over. Context-parallel ranks hold the
  same parameters and see different tokens of the same samples, so they shard the parameters too and
  their gradients are reduced together with the data-parallel ones (the torchtitan layout).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lcv_train.errors import ConfigError
from parallel.config import ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


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
    cp_mode: str = "ring"

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int = 0, local_rank: int = 0) -> "ParallelDims":
        """Resolve ``dp_shard = -1`` and check that the layout multiplies to the world size (no collectives)."""
        cfg.validate()
        if cfg.dp_replicate == -1:  # one replica per node: torchrun's LOCAL_WORLD_SIZE ranks per node
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            if per_node < 1 or world_size % per_node:
                raise ConfigError(f"parallel.dp_replicate: -1 (one replica per node) needs the same number of "
                                  f"ranks on every node; world size {world_size}, {per_node} on this node")
            cfg = dataclasses.replace(cfg, dp_replicate=world_size // per_node)
        rest = cfg.dp_replicate * cfg.cp * cfg.tp
        if world_size % rest:
            raise ConfigError(f"parallel: dp_replicate*cp*tp = {cfg.dp_replicate}*{cfg.cp}*{cfg.tp} = {rest} "
                              f"does not divide the world size {world_size}")
        dp_shard = world_size // rest if cfg.dp_shard == -1 else cfg.dp_shard
        if cfg.dp_replicate * dp_shard * cfg.cp * cfg.tp != world_size:
            raise ConfigError(f"parallel: dp_replicate*dp_shard*cp*tp = {cfg.dp_replicate}*{dp_shard}*{cfg.cp}*{cfg.tp}"
                              f" != world size {world_size}")
        if cfg.engine in ("zero2", "zero3") and (cfg.tp > 1 or cfg.cp > 1 or cfg.dp_replicate > 1):
            raise ConfigError(f"parallel.engine: {cfg.engine} (DeepSpeed) supports plain data parallelism only; "
                              f"got dp_replicate={cfg.dp_replicate}, cp={cfg.cp}, tp={cfg.tp} (use engine=fsdp)")
        return cls(cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp, world_size, rank, local_rank, cp_mode=cfg.cp_mode)

    # -- checks against the model ---------------------------------------------------------------
    def check_model(self, model_cfg) -> None:
        """Raise a one-line ``ConfigError`` when the model cannot be split this way (before any memory is used).
        ``model_cfg`` is a ``DiTConfig``."""
        heads = model_cfg.num_heads
        if heads % self.tp:
            raise ConfigError(f"parallel.tp: model.num_heads={heads} is not divisible by tp={self.tp}")
        if model_cfg.ffn_hidden_size % self.tp:
            raise ConfigError(f"parallel.tp: the FFN hidden size {model_cfg.ffn_hidden_size} is not divisible "
                              f"by tp={self.tp}")
        # Ulysses swaps the token split for a head split; ring attention keeps all heads and needs no check.
        if self.cp_mode == "ulysses" and (heads // self.tp) % self.cp:
            raise ConfigError(f"parallel.cp: model.num_heads={heads} (per tp rank {heads // self.tp}) is not "
                              f"divisible by cp={self.cp} (cp_mode=ulysses splits heads across cp ranks)")

    # -- sizes and ranks -------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        """How many ranks FSDP2 shards a parameter over (dp_shard x cp)."""
        return self.dp_shard * self.cp

    @property
    def uses_fsdp(self) -> bool:
        """Whether parameters/gradients must be sharded or reduced across ranks (any dp or cp > 1)."""
        return self.dp_size * self.cp > 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def _local(self, name: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(name)

    @property
    def dp_rank(self) -> int:
        """Rank among the data-parallel replicas: ranks that differ only in cp/tp see the same data."""
        return self._local("dp_replicate") * self.dp_shard + self._local("dp_shard")

    @property
    def cp_rank(self) -> int:
        return self._local("cp")

    @property
    def tp_rank(self) -> int:
        return self._local("tp")

    # -- mesh ------------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> None:
        """The 4D mesh plus the flattened ``dp`` and ``dp_shard_cp`` dims (collective: every rank calls it)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.dp_replicate, self.dp_shard, self.cp, self.tp)
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")

    def submesh(self, name: str):
        """A named (possibly flattened) sub-mesh: ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``, ``dp``, ``dp_shard_cp``."""
        if self.mesh is None:
            raise RuntimeError("ParallelDims has no mesh (single process): nothing to ask for")
        return self.mesh[name]

    def group(self, name: str):
        """The process group of one (possibly flattened) mesh dim; ``None`` without a mesh."""
        return None if self.mesh is None else self.mesh[name].get_group()

    @property
    def fsdp_mesh(self):
        """What ``fully_shard`` gets: 1D ``dp_shard_cp`` for FSDP, 2D (``dp_replicate``, ``dp_shard_cp``) for HSDP."""
        if self.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_cp"]
        return self.mesh["dp_shard_cp"]

    def describe(self) -> str:
        return (f"world={self.world_size} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x "
                f"cp {self.cp} x tp {self.tp}")


def init_distributed(cfg: ParallelConfig, model_cfg=None) -> ParallelDims:
    """Initialise the process group from the torchrun environment (a no-op for one process).

    The layout is checked against ``WORLD_SIZE`` (and against ``model_cfg``, a ``DiTConfig``, when given:
    heads divisible by tp, ...) before the process group or any device memory is touched."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims.from_config(cfg, world, rank, local_rank)
    if model_cfg is not None:
        dims.check_model(model_cfg)
    if torch.cuda.is_available():
        dims.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(dims.device)
    if world > 1:
        start_process_group(cfg)
        dims.build_mesh(dims.device.type)
    return dims


def start_process_group(cfg: ParallelConfig, timeout_s: float | None = None) -> None:
    """``init_process_group`` from the torchrun environment (no-op for one process or when done already);
    ``timeout_s`` bounds every collective (default: torch's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend=backend, **kwargs)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one scalar all-reduce; ``flag`` itself outside
    torch.distributed), so that all ranks take the same branch: stop, skip a step, abandon a save."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
