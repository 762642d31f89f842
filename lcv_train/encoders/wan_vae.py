"""The Wan 2.1 VAE (diffusers ``AutoencoderKLWan``) loaded from a local LongCat-Video folder.

Latents are normalized per channel with the VAE config's ``latents_mean`` / ``latents_std``:
``encode`` returns ``(z - mean) / std`` (``z`` = posterior mean, or a posterior sample when
``sample_posterior``), ``decode`` computes ``z = latents * std + mean`` and decodes, clamped to [-1, 1].
The VAE is causal in time: ``F = 1 + 4k`` frames give ``1 + k`` latent frames (other counts are a
ValueError naming F, where diffusers would silently drop the trailing frames).
"""

from __future__ import annotations

import torch

from lcv_train.encoders.base import VideoCodec, find_model_folder
from lcv_train.errors import CheckpointError

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


class WanVAECodec(VideoCodec):
    def __init__(self, vae: torch.nn.Module, sample_posterior: bool = False) -> None:
        super().__init__()
        cfg = vae.config
        n_down = len(cfg.dim_mult) - 1
        self.latent_channels = int(cfg.z_dim)
        self.temporal_stride = 2 ** sum(bool(t) for t in list(cfg.temperal_downsample)[:n_down])
        self.spatial_stride = 2 ** n_down * int(getattr(cfg, "patch_size", None) or 1)
        mean, std = list(cfg.latents_mean), list(cfg.latents_std)
        if len(mean) != self.latent_channels or len(std) != self.latent_channels:
            raise CheckpointError(f"VAE config: latents_mean/latents_std have {len(mean)}/{len(std)} entries, "
                                  f"expected z_dim={self.latent_channels}")
        self.vae = vae
        self.sample_posterior = sample_posterior
        shape = (1, self.latent_channels, 1, 1, 1)
        # float32 and not persistent: the constants come from the VAE config, not from our checkpoints.
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(shape),
                             persistent=False)
        self.freeze()

    @classmethod
    def from_local(cls, path: str, subfolder: str = "vae", dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cpu", sample_posterior: bool = False, tiling: bool = False,
                   slicing: bool = False, key: str = "vae.path") -> "WanVAECodec":
        folder = find_model_folder(path, subfolder, key, WEIGHT_FILES)
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        return cls(vae, sample_posterior=sample_posterior).to(device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the VAE runs in (inputs are cast to it; outputs come back as float32)."""
        return next(self.vae.parameters()).dtype

    def _encode(self, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        posterior = self.vae.encode(video.to(self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()
        return (z.float() - self.latents_mean) / self.latents_std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(self.dtype)).sample
