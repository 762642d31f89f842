"""The DiT's configuration: one dataclass, its presets, and its validation.

Keys mirror the published checkpoint's ``dit/config.json`` so that a config read from there builds the
same network; ``attention`` and ``bsa`` choose the attention operator (see ``attention.py``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcv_train.errors import ConfigError, require


# The keys of the published ``dit/config.json``'s ``bsa_params`` (the reference passes them as keyword
# arguments to its kernel); every one is read and used.
BSA_PARAMS_KEYS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")


@dataclass
class BSAConfig:
    """Block-sparse attention settings (SPEC section 5; selection rule in ``kernels/bsa/select.py``).

    ``sparsity`` (top-k rule; None for the CDF rule alone), ``cdf_threshold`` (CDF rule; with sparsity too,
    the larger count), query and key block shapes: as the published ``bsa_params``. ``fp32_scores`` pools
    and scores in fp32 instead of the input dtype (off: the published kernel scores in bf16)."""

    sparsity: float | None = 0.9375
    chunk_3d_shape_q: tuple[int, int, int] = (4, 4, 4)
    chunk_3d_shape_k: tuple[int, int, int] = (4, 4, 4)
    cdf_threshold: float | None = None
    backend: str = "auto"
    fp32_scores: bool = False


@dataclass
class DiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: float = 4.0
    ffn_multiple_of: int = 256
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    text_tokens_zero_pad: bool = True
    # Which attention operator the blocks use: "dense" (SDPA / flash-attn) or "bsa" (block-sparse on
    # video tokens, dense when T == 1). Context parallelism wraps whichever is chosen (parallel/).
    attention: str = "dense"
    bsa: BSAConfig = field(default_factory=BSAConfig)
    # Kept for checkpoint-config compatibility; the published inference code reads them.
    enable_bsa: bool = False
    cp_split_hw: Any = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        hidden = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels given to the (t, h, w) axes of the 3D RoPE."""
        hd = self.head_dim
        return (hd - 4 * (hd // 6), 2 * (hd // 6), 2 * (hd // 6))

    def validate(self, prefix: str = "model") -> "DiTConfig":
        for key in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                    "adaln_tembed_dim", "frequency_embedding_size", "ffn_multiple_of"):
            require(int(getattr(self, key)) > 0, f"{prefix}.{key}", f"must be a positive integer, got {getattr(self, key)}")
        require(self.hidden_size % self.num_heads == 0, f"{prefix}.hidden_size",
             f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        require(self.head_dim % 2 == 0 and all(d % 2 == 0 and d > 0 for d in self.rope_split), f"{prefix}.num_heads",
             f"head_dim={self.head_dim} cannot be split into even (t, h, w) RoPE parts {self.rope_split}")
        require(self.frequency_embedding_size % 2 == 0, f"{prefix}.frequency_embedding_size", "must be even")
        require(self.mlp_ratio > 0, f"{prefix}.mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        require(len(self.patch_size) == 3 and all(int(p) > 0 for p in self.patch_size), f"{prefix}.patch_size",
             f"must be three positive integers, got {self.patch_size}")
        require(int(self.patch_size[0]) == 1, f"{prefix}.patch_size", "the temporal patch must be 1 (SPEC section 1)")
        require(self.attention in ("dense", "bsa"), f"{prefix}.attention", f"must be 'dense' or 'bsa', got {self.attention!r}")
        require(self.bsa.sparsity is None or 0.0 <= self.bsa.sparsity < 1.0, f"{prefix}.bsa.sparsity",
             f"must be in [0, 1) or null, got {self.bsa.sparsity}")
        require(self.bsa.cdf_threshold is None or 0.0 < self.bsa.cdf_threshold <= 1.0, f"{prefix}.bsa.cdf_threshold",
             f"must be in (0, 1] or null, got {self.bsa.cdf_threshold}")
        require(self.bsa.sparsity is not None or self.bsa.cdf_threshold is not None, f"{prefix}.bsa.sparsity",
             "sparsity and cdf_threshold are both null; set at least one")
        for key in ("chunk_3d_shape_q", "chunk_3d_shape_k"):
            shape = getattr(self.bsa, key)
            require(len(shape) == 3 and all(int(b) > 0 for b in shape), f"{prefix}.bsa.{key}",
                 f"must be three positive integers (t, h, w), got {shape}")
            setattr(self.bsa, key, tuple(int(b) for b in shape))
        require(self.bsa.backend in ("auto", "torch", "triton"), f"{prefix}.bsa.backend",
             f"must be auto|torch|triton, got {self.bsa.backend!r}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.enable_bsa = self.attention == "bsa"  # derived; kept for the published config format
        return self

    # -- (de)serialisation in the published config.json format ---------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bsa_params"] = {"sparsity": self.bsa.sparsity, "cdf_threshold": self.bsa.cdf_threshold,
                           "chunk_3d_shape_q": list(self.bsa.chunk_3d_shape_q),
                           "chunk_3d_shape_k": list(self.bsa.chunk_3d_shape_k)}
        d["patch_size"] = list(self.patch_size)
        d["enable_bsa"] = self.attention == "bsa"
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k not in ("bsa",)}
        bsa = BSAConfig()
        if isinstance(d.get("bsa"), dict):
            bsa = BSAConfig(**{k: v for k, v in d["bsa"].items() if k in {f.name for f in dataclasses.fields(BSAConfig)}})
        if isinstance(d.get("bsa_params"), dict):
            p = d["bsa_params"]
            unknown = sorted(set(p) - set(BSA_PARAMS_KEYS))
            if unknown:
                raise ConfigError(f"bsa_params: unknown key(s) {unknown}; the published kernel takes only "
                                  f"{list(BSA_PARAMS_KEYS)}")
            bsa.sparsity = p.get("sparsity", bsa.sparsity)
            bsa.cdf_threshold = p.get("cdf_threshold", bsa.cdf_threshold)
            bsa.chunk_3d_shape_q = tuple(p.get("chunk_3d_shape_q", bsa.chunk_3d_shape_q))
            bsa.chunk_3d_shape_k = tuple(p.get("chunk_3d_shape_k", bsa.chunk_3d_shape_k))
        kwargs["bsa"] = bsa
        if "patch_size" in kwargs and isinstance(kwargs["patch_size"], int):
            p = kwargs["patch_size"]
            kwargs["patch_size"] = (1, p, p)
        if "attention" not in d and d.get("enable_bsa"):
            kwargs["attention"] = "bsa"
        return cls(**kwargs).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DiT config not found: {path} (expected the checkpoint's dit/config.json)")
        return cls.from_json_dict(json.loads(path.read_text()))


PRESETS: dict[str, dict[str, Any]] = {
    # The published LongCat-Video DiT: 13.58B parameters.
    "longcat-13.6b": dict(hidden_size=4096, depth=48, num_heads=32, caption_channels=4096, adaln_tembed_dim=512),
    # A few-minute CPU model for the embedded default and tests.
    "tiny": dict(hidden_size=64, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=64, ffn_multiple_of=64),
    "demo": dict(hidden_size=128, depth=2, num_heads=4, caption_channels=32, adaln_tembed_dim=128, ffn_multiple_of=64),
    # Small enough to train on one GPU in an afternoon; same code paths as the large one.
    "small": dict(hidden_size=256, depth=4, num_heads=4, caption_channels=128, adaln_tembed_dim=128, ffn_multiple_of=64),
}


def preset(name: str, **overrides: Any) -> DiTConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DiTConfig(**{**PRESETS[name], **overrides}).validate()
