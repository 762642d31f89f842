"""The two frozen encoders the trainer talks to, and the config helpers their builders share.

A ``VideoCodec`` maps pixel video ``[B, 3, F, H, W]`` in [-1, 1] to normalized latents
``[B, C, T, h, w]`` and back; a ``TextEncoder`` maps captions to ``(emb [B, L, D], mask [B, L])``.
Both are ``nn.Module`` subclasses only so that ``.to(device)`` and ``state_dict`` behave as usual: their
parameters never require grad, they stay in eval mode (``train()`` is a no-op), and they run under
``torch.no_grad``. Outputs are float32 on the encoder's device whatever dtype the model runs in.
"""

from __future__ import annotations

import abc

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcv_train.errors import ConfigError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# What OmegaConf writes for a mandatory value that was never set.
_MISSING = "???"


class _Frozen(nn.Module, metaclass=abc.ABCMeta):
    """An nn.Module that is always in eval mode with no trainable parameters."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_Frozen":  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


class VideoCodec(_Frozen):
    """Pixel video <-> normalized latents.

    Subclasses set ``latent_channels``, ``temporal_stride``, ``spatial_stride`` and implement
    ``_encode`` / ``_decode`` on tensors already checked and moved to the codec's device.
    A codec with ``temporal_stride`` s > 1 is causal: ``F = 1 + s*k`` frames give ``1 + k`` latent frames.
    """

    latent_channels: int
    temporal_stride: int
    spatial_stride: int

    # -- geometry ---------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames; ValueError if the count is not allowed."""
        s = self.temporal_stride
        if num_frames < 1 or (num_frames - 1) % s != 0:
            allowed = "1, " + ", ".join(str(1 + s * k) for k in range(1, 4)) + ", ..."
            raise ValueError(f"num_frames F={num_frames} is not 1 + {s}k ({type(self).__name__} is causal "
                             f"with temporal stride {s}; use F in {allowed})")
        return 1 + (num_frames - 1) // s

    def pixel_frames(self, latent_frames: int) -> int:
        """Inverse of ``latent_frames``: pixel frames that decode from ``latent_frames`` latents."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_stride

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T, h, w)`` of the latents of one ``num_frames x height x width`` video."""
        s = self.spatial_stride
        for name, size in (("H", height), ("W", width)):
            if size < 1 or size % s != 0:
                raise ValueError(f"video {name}={size} is not a positive multiple of the spatial stride {s} "
                                 f"of {type(self).__name__}")
        return (self.latent_channels, self.latent_frames(num_frames), height // s, width // s)

    # -- encode / decode --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``video [B, 3, F, H, W]`` in [-1, 1] -> normalized latents ``[B, C, T, h, w]`` (float32)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B, 3, F, H, W], got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        return self._encode(video.to(self.device), generator).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized ``latents [B, C, T, h, w]`` -> ``video [B, 3, F, H, W]`` in [-1, 1] (float32)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents [B, {self.latent_channels}, T, h, w], "
                             f"got shape {tuple(latents.shape)}")
        return self._decode(latents.to(self.device)).float().clamp_(-1.0, 1.0)

    @abc.abstractmethod
    def _encode(self, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Checked video on the codec's device -> normalized latents."""

    @abc.abstractmethod
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents on the codec's device -> video in about [-1, 1]."""


class TextEncoder(_Frozen):
    """Captions -> ``(emb [B, L, D] float32, mask [B, L] bool)``, True on real tokens (EOS included).

    ``L`` is always ``max_length``: captions are padded (and truncated) to it, so every batch has the
    same shape. Padded positions of ``emb`` are exactly zero (LongCat's ``text_tokens_zero_pad``).
    """

    dim: int
    max_length: int

    @torch.no_grad()
    def encode(self, captions: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("encode expects a list of caption strings")
        if len(captions) == 0:
            raise ValueError("encode got an empty list of captions")
        emb, mask = self._encode(list(captions))
        mask = mask.to(torch.bool)
        return emb.float().masked_fill(~mask.unsqueeze(-1), 0.0), mask

    @abc.abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings, mask) before padding is zeroed."""


# -- config helpers shared by the builders -----------------------------------------------------------

def to_plain_dict(cfg: Any, prefix: str) -> dict[str, Any]:
    """A dict / OmegaConf section as a plain dict (unset ``???`` values stay the string ``"???"``)."""
    if cfg is None:
        raise ConfigError(f"{prefix}: missing section (needs at least `{prefix}.kind`)")
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping with a `kind` key, got {type(cfg).__name__}")
    return dict(cfg)


def parse_dtype(value: Any, key: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ConfigError(f"{key}={value!r}: expected one of fp32, bf16, fp16")


def parse_device(value: Any, key: str) -> torch.device:
    try:
        return torch.device("cpu" if value is None else value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{key}={value!r}: not a torch device ({e})") from None


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")
    return value


def need_path(value: Any, key: str, expected: str) -> str:
    """A set, non-empty path option; ``expected`` says what the folder must contain."""
    if value is None or value == _MISSING or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{key} is not set: set {key}=/path/to/LongCat-Video (the folder with {expected})")
    return str(value)


def find_model_folder(path: str, subfolder: str, key: str, weight_files: tuple[str, ...]) -> Path:
    """``path/subfolder`` after checking it holds ``config.json`` and one of ``weight_files``.

    Raises FileNotFoundError naming the exact file looked for and the setting that fixes it.
    """
    root = Path(path).expanduser()
    folder = root / subfolder if subfolder else root
    config = folder / "config.json"
    fix = f"set {key}=/path/to/LongCat-Video"
    if not root.is_dir():
        raise FileNotFoundError(f"{key}={path}: no such folder; {fix} (expected {config})")
    if not config.is_file():
        raise FileNotFoundError(f"{key}={path}: missing {config}; {fix} "
                                f"(expected <path>/{subfolder + '/' if subfolder else ''}config.json)")
    if not any((folder / name).is_file() for name in weight_files):
        raise FileNotFoundError(f"{key}={path}: no weights in {folder} (expected {folder / weight_files[0]} "
                                f"or {' / '.join(weight_files[1:])}); {fix} with the complete download")
    return folder
