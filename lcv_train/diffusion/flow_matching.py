"""Flow matching with the published LongCat convention (SPEC section 3).

``x_t = sigma * eps + (1 - sigma) * x0``, the network predicts ``v = x0 - eps`` (diffusers' Euler step
uses the opposite sign: ``eps - x0``), timesteps are ``1000 * sigma``. Training samples sigma from a
logit-normal and shifts it toward high noise for longer sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lcv_train.errors import require


@dataclass
class FlowMatchingConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Shift grows with the number of noisy tokens: log(shift) is linear in tokens between these anchors
    # (clamped outside). shift_min == shift_max gives a constant shift.
    shift_min: float = 1.0
    shift_max: float = 12.0
    shift_tokens_min: int = 256
    shift_tokens_max: int = 37440  # 480p, 93 frames: 24 x 30 x 52 patches
    # Diffusion-forcing style noise on condition frames against colour drift (SPEC section 2):
    # sigma_cond ~ U(0, cond_noise_max); their timestep stays 0, as at inference.
    cond_noise_max: float = 0.0
    # Probability of training a sample on the null text (what classifier-free guidance contrasts with).
    text_dropout: float = 0.1

    def validate(self, prefix: str = "diffusion") -> "FlowMatchingConfig":
        require(self.logit_std > 0, f"{prefix}.logit_std", f"must be > 0, got {self.logit_std}")
        require(self.shift_min > 0 and self.shift_max > 0, f"{prefix}.shift_min", "shifts must be > 0")
        require(0 < self.shift_tokens_min <= self.shift_tokens_max, f"{prefix}.shift_tokens_min",
             "must satisfy 0 < shift_tokens_min <= shift_tokens_max")
        require(0.0 <= self.cond_noise_max < 1.0, f"{prefix}.cond_noise_max", f"must be in [0, 1), got {self.cond_noise_max}")
        require(0.0 <= self.text_dropout <= 1.0, f"{prefix}.text_dropout", f"must be in [0, 1], got {self.text_dropout}")
        return self


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``s * sigma / (1 + (s - 1) * sigma)``: moves mass toward sigma = 1 (more noise) for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_for_tokens(num_tokens: int, cfg: FlowMatchingConfig) -> float:
    lo, hi = cfg.shift_tokens_min, cfg.shift_tokens_max
    if hi == lo:
        return cfg.shift_max
    a = min(max((num_tokens - lo) / (hi - lo), 0.0), 1.0)
    return math.exp((1 - a) * math.log(cfg.shift_min) + a * math.log(cfg.shift_max))


def sample_sigmas(batch: int, cfg: FlowMatchingConfig, num_tokens: int, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """Logit-normal sigmas, shifted for ``num_tokens`` noisy tokens; fp32 ``[batch]`` in (0, 1)."""
    u = torch.randn(batch, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return shift_sigma(torch.sigmoid(u), shift_for_tokens(num_tokens, cfg))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``sigma * eps + (1 - sigma) * x0`` with sigma ``[B]`` or ``[B, T]`` broadcast over ``[B, C, T, H, W]``."""
    s = sigma.float()
    s = s.view(-1, 1, 1, 1, 1) if s.dim() == 1 else s[:, None, :, None, None]
    return (s * eps.float() + (1 - s) * x0.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x0 - eps


@dataclass
class TrainingInputs:
    noisy: torch.Tensor  # [B, C, T, H, W]: clean (or slightly noised) condition frames, then x_t
    timestep: torch.Tensor  # [B, T] on the 0..1000 scale, 0 on condition frames
    target: torch.Tensor  # [B, C, T - Tc, H, W]: x0 - eps of the noisy frames
    sigma: torch.Tensor  # [B]


def make_training_inputs(x0: torch.Tensor, num_cond: int, cfg: FlowMatchingConfig, num_noisy_tokens: int,
                         generator: torch.Generator | None = None) -> TrainingInputs:
    B, _, T = x0.shape[:3]
    dev = x0.device
    sigma = sample_sigmas(B, cfg, num_noisy_tokens, generator, dev)
    eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32).to(x0.dtype)
    per_frame = sigma[:, None].expand(B, T).clone()
    per_frame[:, :num_cond] = 0.0
    if num_cond and cfg.cond_noise_max > 0:
        per_frame[:, :num_cond] = torch.rand(B, 1, generator=generator, device=dev) * cfg.cond_noise_max
    noisy = add_noise(x0, eps, per_frame)
    timestep = (sigma[:, None] * 1000.0).expand(B, T).clone()
    timestep[:, :num_cond] = 0.0
    target = velocity_target(x0[:, :, num_cond:], eps[:, :, num_cond:])
    return TrainingInputs(noisy, timestep, target, sigma)


def flow_matching_loss(v_pred: torch.Tensor, target: torch.Tensor, num_cond: int) -> torch.Tensor:
    """MSE over the noisy frames only; ``v_pred`` covers all frames, ``target`` the noisy ones."""
    return torch.mean((v_pred[:, :, num_cond:].float() - target.float()) ** 2)


def null_text(text: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional text: one all-zero token (the model's cross-attention needs one key)."""
    B, L = text.shape[:2]
    null_mask = torch.zeros(B, L, dtype=torch.bool, device=text.device)
    null_mask[:, 0] = True
    return torch.zeros_like(text), null_mask


def drop_text(text: torch.Tensor, mask: torch.Tensor | None, p: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text by ``null_text`` with probability ``p``."""
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    if p <= 0:
        return text, mask
    drop = torch.rand(text.shape[0], generator=generator, device=text.device) < p
    nt, nm = null_text(text, mask)
    return torch.where(drop[:, None, None], nt, text), torch.where(drop[:, None], nm, mask)
