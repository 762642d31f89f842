"""The VAE and the text encoder behind one interface, real (Wan 2.1 VAE, umT5-XXL) and stand-in.

    codec = build_video_codec(cfg.vae)              # kind: pixel | wan2.1
    latents = codec.encode(video)                   # [B, 3, F, H, W] in [-1, 1] -> [B, C, T, h, w], normalized
    video = codec.decode(latents)                   # -> [B, 3, F, H, W] in [-1, 1]
    text = build_text_encoder(cfg.text_encoder)     # kind: tiny_umt5 | umt5_xxl
    emb, mask = text.encode(captions)               # [B, max_length, text.dim] float32, [B, max_length] bool

Config keys per kind (defaults in brackets; unknown keys are a ConfigError naming them):

* ``vae.kind=pixel``: ``device`` [cpu].
* ``vae.kind=wan2.1``: ``path`` (required: the LongCat-Video folder), ``subfolder`` [vae], ``dtype`` [bf16],
  ``device`` [cpu], ``sample_posterior`` [false], ``tiling`` [false], ``slicing`` [false].
* ``text_encoder.kind=tiny_umt5``: ``dim`` [32], ``max_length`` [96], ``num_layers`` [2], ``num_heads`` [4],
  ``seed`` [0], ``dtype`` [fp32], ``device`` [cpu].
* ``text_encoder.kind=umt5_xxl``: ``path`` (required), ``subfolder`` [text_encoder],
  ``tokenizer_subfolder`` [tokenizer], ``max_length`` [512], ``dtype`` [bf16], ``device`` [cpu].

The real kinds import diffusers / transformers only when built. Nothing here touches the network:
weights come from the local ``path`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from conf.parsing import from_mapping
from lcv_train.encoders.base import (TextEncoder, VideoCodec, need_path, parse_device, parse_dtype, positive_int,
                                     to_plain_dict)
from lcv_train.errors import ConfigError

__all__ = ["VideoCodec", "TextEncoder", "build_video_codec", "build_text_encoder",
           "VIDEO_CODEC_KINDS", "TEXT_ENCODER_KINDS"]

VIDEO_CODEC_KINDS = ("pixel", "wan2.1")
TEXT_ENCODER_KINDS = ("tiny_umt5", "umt5_xxl")


# The options of each kind, with their defaults; parsed (unknown keys, value types) by the one config parser.
@dataclass
class PixelCodecOptions:
    kind: str = "pixel"
    device: Any = "cpu"


@dataclass
class WanVAEOptions:
    kind: str = "wan2.1"
    path: Optional[str] = None
    subfolder: Optional[str] = "vae"
    dtype: Any = "bf16"
    device: Any = "cpu"
    sample_posterior: bool = False
    tiling: bool = False
    slicing: bool = False


@dataclass
class TinyUMT5Options:
    kind: str = "tiny_umt5"
    dim: int = 32
    max_length: int = 32  # as conf/text_encoder/tiny_umt5.yaml: the synthetic captions (<= 16 words) are never cut
    tokenizer: str = "words"  # words | bytes (lcv_train/encoders/standins.py)
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0
    dtype: Any = "fp32"
    device: Any = "cpu"


@dataclass
class UMT5XXLOptions:
    kind: str = "umt5_xxl"
    path: Optional[str] = None
    subfolder: Optional[str] = "text_encoder"
    tokenizer_subfolder: Optional[str] = "tokenizer"
    max_length: int = 512
    dtype: Any = "bf16"
    device: Any = "cpu"


_CODEC_OPTIONS = {"pixel": PixelCodecOptions, "wan2.1": WanVAEOptions}
_TEXT_OPTIONS = {"tiny_umt5": TinyUMT5Options, "umt5_xxl": UMT5XXLOptions}


def _kind(cfg: dict[str, Any], choices: tuple[str, ...], prefix: str) -> str:
    kind = cfg.get("kind")
    if kind not in choices:
        raise ConfigError(f"{prefix}.kind={kind!r}: unknown; choose one of {', '.join(choices)}")
    return kind


def _subfolder(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: must be a folder name (or null for the path itself)")
    return value


def build_video_codec(cfg: Any, prefix: str = "vae") -> VideoCodec:
    """Build the codec that ``cfg.kind`` names; every option is validated here, once."""
    raw = to_plain_dict(cfg, prefix)
    kind = _kind(raw, VIDEO_CODEC_KINDS, prefix)
    o = from_mapping(_CODEC_OPTIONS[kind], raw, prefix)
    device = parse_device(o.device, f"{prefix}.device")
    if kind == "pixel":
        from lcv_train.encoders.standins import PixelCodec

        return PixelCodec(device=device)
    path = need_path(o.path, f"{prefix}.path", f"{o.subfolder or '.'}/config.json")
    from lcv_train.encoders.wan_vae import WanVAECodec

    return WanVAECodec.from_local(
        path, subfolder=_subfolder(o.subfolder, f"{prefix}.subfolder"),
        dtype=parse_dtype(o.dtype, f"{prefix}.dtype"), device=device, sample_posterior=o.sample_posterior,
        tiling=o.tiling, slicing=o.slicing, key=f"{prefix}.path",
    )


def build_text_encoder(cfg: Any, prefix: str = "text_encoder") -> TextEncoder:
    """Build the text encoder that ``cfg.kind`` names; every option is validated here, once."""
    raw = to_plain_dict(cfg, prefix)
    kind = _kind(raw, TEXT_ENCODER_KINDS, prefix)
    o = from_mapping(_TEXT_OPTIONS[kind], raw, prefix)
    device = parse_device(o.device, f"{prefix}.device")
    dtype = parse_dtype(o.dtype, f"{prefix}.dtype")
    max_length = positive_int(o.max_length, f"{prefix}.max_length")
    if max_length < 2:
        raise ConfigError(f"{prefix}.max_length={max_length}: must be >= 2 (one token plus EOS)")
    if kind == "tiny_umt5":
        from lcv_train.encoders.standins import TinyUMT5TextEncoder

        dim = positive_int(o.dim, f"{prefix}.dim")
        heads = positive_int(o.num_heads, f"{prefix}.num_heads")
        if dim % heads != 0:
            raise ConfigError(f"{prefix}.dim={dim}: must be divisible by {prefix}.num_heads={heads}")
        seed = o.seed
        if seed < 0:
            raise ConfigError(f"{prefix}.seed={seed!r}: must be a non-negative integer")
        from lcv_train.encoders.standins import TOKENIZERS

        if o.tokenizer not in TOKENIZERS:
            raise ConfigError(f"{prefix}.tokenizer={o.tokenizer!r}: unknown; choose one of {', '.join(TOKENIZERS)}")
        return TinyUMT5TextEncoder(dim=dim, max_length=max_length, tokenizer=o.tokenizer,
                                   num_layers=positive_int(o.num_layers, f"{prefix}.num_layers"),
                                   num_heads=heads, seed=seed, dtype=dtype, device=device)
    path = need_path(o.path, f"{prefix}.path", f"{o.subfolder or '.'}/config.json")
    from lcv_train.encoders.umt5 import UMT5TextEncoder

    return UMT5TextEncoder.from_local(
        path, subfolder=_subfolder(o.subfolder, f"{prefix}.subfolder"),
        tokenizer_subfolder=_subfolder(o.tokenizer_subfolder, f"{prefix}.tokenizer_subfolder"),
        max_length=max_length, dtype=dtype, device=device, key=f"{prefix}.path",
    )
