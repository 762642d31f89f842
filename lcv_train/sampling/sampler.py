"""Euler ODE sampling for T2V / I2V / VC with classifier-free guidance (SPEC section 3).

Condition latents are encoded once into a K/V cache (``LongCatDiT.encode_condition``) and reused for every
step and both guidance branches. The network predicts ``v = x0 - eps``; with ``x = s*eps + (1-s)*x0`` the
ODE is ``dx/ds = eps - x0 = -v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcv_train.diffusion.flow_matching import null_text, shift_sigma


@dataclass
class SamplerConfig:
    steps: int = 50
    shift: float = 12.0
    guidance: float = 4.0
    cfg_zero_star: bool = True  # rescale the unconditional branch by <v_c, v_u> / |v_u|^2 (CFG-Zero*)


def sigma_schedule(steps: int, shift: float, device=None, start: float = 1.0) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas from ``start`` to 0, shifted."""
    s = torch.linspace(start, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_sigma(s, shift).float()


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float, zero_star: bool) -> torch.Tensor:
    if zero_star:
        dims = tuple(range(1, v_cond.dim()))
        st = (v_cond * v_uncond).sum(dims, keepdim=True) / (v_uncond.pow(2).sum(dims, keepdim=True) + 1e-8)
        v_uncond = v_uncond * st
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(model, text, text_mask, latent_shape, cfg: SamplerConfig, *, neg_text=None, neg_mask=None,
           cond_latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate latents ``[B, C, T, H, W]`` for the noisy frames (condition frames not included).

    ``latent_shape`` is (C, T, H, W) of the frames to generate; ``cond_latents`` (I2V: 1 frame, VC: k)
    precede them. ``neg_text`` defaults to the null text that training's text dropout uses when guidance != 1.
    """
    B = text.shape[0]
    device = text.device
    x = noise if noise is not None else torch.randn((B, *latent_shape), generator=generator, device=device)
    cache = model.encode_condition(cond_latents) if cond_latents is not None else None
    use_cfg = cfg.guidance != 1.0
    if use_cfg and neg_text is None:
        neg_text, neg_mask = null_text(text, text_mask)  # what training's text dropout uses
    sigmas = sigma_schedule(cfg.steps, cfg.shift, device)
    for i in range(cfg.steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = torch.full((B,), float(s) * 1000.0, device=device)
        v = model(x, t, text, text_mask, cond_cache=cache)
        if use_cfg:
            v_u = model(x, t, neg_text, neg_mask, cond_cache=cache)
            v = guided_velocity(v.float(), v_u.float(), cfg.guidance, cfg.cfg_zero_star)
        x = (x.float() - (s_next - s) * v.float()).to(x.dtype)
    return x
