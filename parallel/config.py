"""The parallel layout as configuration (``conf/parallel/*.yaml``), validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from conf.parsing import require


@dataclass
class ParallelConfig:
    name: str = "single"
    # engine: "fsdp" (FSDP2; also single-process when world size is 1), "zero2" / "zero3" (DeepSpeed)
    engine: str = "fsdp"
    dp_replicate: int = 1  # HSDP: replicate across this many groups (typically nodes); -1: one per node
    dp_shard: int = -1  # -1: whatever is left of the world size
    cp: int = 1
    cp_mode: str = "ring"
    # (ch, cw): each frame's token grid is cut into ch x cw tiles, one per cp rank (ch * cw = cp);
    # None: per resolution, the split with the least padding (parallel/context_parallel/layout.py)
    cp_split_hw: tuple[int, int] | None = None
    tp: int = 1
    mixed_precision: str = "bf16"  # compute dtype on GPU: bf16 | fp32 (reduce and master weights stay fp32)
    cpu_offload: bool = False
    activation_checkpointing: int = 0  # checkpoint every k-th block; 0 = off
    compile: bool = False
    backend: str = "auto"  # process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def validate(self, prefix: str = "parallel") -> "ParallelConfig":
        require(self.engine in ("fsdp", "zero2", "zero3"), f"{prefix}.engine", f"must be fsdp|zero2|zero3, got {self.engine!r}")
        require(self.dp_replicate == -1 or self.dp_replicate >= 1, f"{prefix}.dp_replicate",
                f"must be -1 (one replica per node) or >= 1, got {self.dp_replicate}")
        require(self.dp_shard == -1 or self.dp_shard >= 1, f"{prefix}.dp_shard", f"must be -1 or >= 1, got {self.dp_shard}")
        require(self.cp >= 1, f"{prefix}.cp", f"must be >= 1, got {self.cp}")
        if self.cp_split_hw is not None:
            ch, cw = self.cp_split_hw
            require(ch >= 1 and cw >= 1 and ch * cw == self.cp, f"{prefix}.cp_split_hw",
                    f"must be [ch, cw] with ch * cw = cp = {self.cp}, got {list(self.cp_split_hw)}; or null for the "
                    f"split with the least padding")
        require(self.tp >= 1, f"{prefix}.tp", f"must be >= 1, got {self.tp}")
        require(self.cp_mode in ("ring", "ulysses"), f"{prefix}.cp_mode", f"must be ring|ulysses, got {self.cp_mode!r}")
        require(self.mixed_precision in ("bf16", "fp32"), f"{prefix}.mixed_precision", f"must be bf16|fp32, got {self.mixed_precision!r}")
        require(self.activation_checkpointing >= 0, f"{prefix}.activation_checkpointing", "must be >= 0 (0 = off)")
        require(self.backend in ("auto", "nccl", "gloo"), f"{prefix}.backend", f"must be auto|nccl|gloo, got {self.backend!r}")
        return self
