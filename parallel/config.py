"""The parallel layout as configuration (``conf/parallel/*.yaml``), validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from lcv_train.errors import ConfigError


@dataclass
class ParallelConfig:
    name: str = "single"
    # engine: "fsdp" (FSDP2; also single-process when world size is 1), "zero2" / "zero3" (DeepSpeed)
    engine: str = "fsdp"
    dp_replicate: int = 1  # HSDP: replicate across this many groups (typically nodes)
    dp_shard: int = -1  # -1: whatever is left of the world size
    cp: int = 1
    cp_mode: str = "ring"
    tp: int = 1
    mixed_precision: str = "bf16"  # compute dtype on GPU: bf16 | fp32 (reduce and master weights stay fp32)
    cpu_offload: bool = False
    activation_checkpointing: int = 0  # checkpoint every k-th block; 0 = off
    compile: bool = False
    backend: str = "auto"  # process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def validate(self, prefix: str = "parallel") -> "ParallelConfig":
        def need(ok, key, what):
            if not ok:
                raise ConfigError(f"{prefix}.{key}: {what}")

        need(self.engine in ("fsdp", "zero2", "zero3"), "engine", f"must be fsdp|zero2|zero3, got {self.engine!r}")
        need(self.dp_replicate >= 1, "dp_replicate", f"must be >= 1, got {self.dp_replicate}")
        need(self.dp_shard == -1 or self.dp_shard >= 1, "dp_shard", f"must be -1 or >= 1, got {self.dp_shard}")
        need(self.cp >= 1, "cp", f"must be >= 1, got {self.cp}")
        need(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")
        need(self.cp_mode in ("ring", "ulysses"), "cp_mode", f"must be ring|ulysses, got {self.cp_mode!r}")
        need(self.mixed_precision in ("bf16", "fp32"), "mixed_precision", f"must be bf16|fp32, got {self.mixed_precision!r}")
        need(self.activation_checkpointing >= 0, "activation_checkpointing", "must be >= 0 (0 = off)")
        need(self.backend in ("auto", "nccl", "gloo"), "backend", f"must be auto|nccl|gloo, got {self.backend!r}")
        return self
