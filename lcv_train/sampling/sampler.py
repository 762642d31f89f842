"""The sampling loop for T2V / I2V / VC (SPEC sections 2, 3 and 9), built from small parts:

- a sigma schedule (``schedules.py``),
- the condition (``Denoiser``): condition latents encoded once into a K/V cache
  (``LongCatDiT.encode_condition``) and reused for every step and both guidance branches, or, uncached,
  put in front of the noisy latents at every call (the same numbers, more compute; for checks),
- guidance (``guidance.py``: CFG, CFG-Zero*, a negative text),
- a step rule (``steps.py``: the Euler ODE step; the flow SDE step GRPO uses).

The network predicts ``v = x0 - eps``; with ``x = s*eps + (1-s)*x0`` the ODE is ``dx/ds = eps - x0 = -v``,
so step rules get ``u = -v`` in fp32. Timesteps are ``1000 * sigma`` cast to the DiT's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lcv_train.diffusion.flow_matching import null_text
from lcv_train.sampling.guidance import guided_velocity, uses_cfg
from lcv_train.sampling.schedules import sigma_schedule
from lcv_train.sampling.steps import EulerStep


@dataclass
class SamplerConfig:
    steps: int = 50
    shift: float = 12.0
    guidance: float = 4.0
    cfg_zero_star: bool = True  # rescale the unconditional branch by <v_c, v_u> / |v_u|^2 (CFG-Zero*)


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


class Denoiser:
    """The model's velocity for the noisy frames ``x`` with the condition frames (if any) in front.

    ``use_cache=True`` computes the condition's K/V once, here; ``False`` runs the condition frames through
    the whole model at every call and drops their output (the reference the cache is tested against)."""

    def __init__(self, model, cond_latents: torch.Tensor | None = None, use_cache: bool = True):
        self.model = model
        self.dtype = _model_dtype(model)
        self.cond = cond_latents.to(self.dtype) if cond_latents is not None else None
        self.cache = (model.encode_condition(self.cond) if self.cond is not None and use_cache else None)

    @property
    def num_cond(self) -> int:
        return 0 if self.cond is None else self.cond.shape[2]

    def __call__(self, x: torch.Tensor, sigma: float, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device).to(self.dtype)
        x = x.to(self.dtype)
        text = text.to(self.dtype)
        if self.cond is None:
            return self.model(x, t, text, mask)
        if self.cache is not None:
            return self.model(x, t, text, mask, cond_cache=self.cache)
        out = self.model(torch.cat([self.cond, x], dim=2), t, text, mask, num_cond_latents=self.num_cond)
        return out[:, :, self.num_cond:]


def denoise(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, text, text_mask, *, guidance: float = 1.0,
            zero_star: bool = True, neg_text=None, neg_mask=None, step_rule=None,
            generator: torch.Generator | None = None,
            on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate ``x`` (fp32, noisy frames) along ``sigmas``; ``on_step(i, x_next)`` after each step."""
    step_rule = step_rule or EulerStep()
    cfg = uses_cfg(guidance)
    if cfg and neg_text is None:
        raise ValueError("guidance > 1 needs a negative text (neg_text)")
    x = x.float()
    values = [float(s) for s in sigmas]
    for i in range(len(values) - 1):
        s, s_next = values[i], values[i + 1]
        v = denoiser(x, s, text, text_mask).float()
        if cfg:
            v = guided_velocity(v, denoiser(x, s, neg_text, neg_mask).float(), guidance, zero_star)
        x = step_rule(x, -v, s, s_next, generator, index=i)
        if on_step is not None:
            on_step(i, x)
    return x


@torch.no_grad()
def sample(model, text, text_mask, latent_shape, cfg: SamplerConfig, *, neg_text=None, neg_mask=None,
           cond_latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None, schedule: str = "base",
           step_rule=None, use_cache: bool = True, x_start: torch.Tensor | None = None) -> torch.Tensor:
    """Generate latents ``[B, C, T, H, W]`` for the noisy frames (condition frames not included).

    ``latent_shape`` is (C, T, H, W) of the frames to generate; ``cond_latents`` (I2V: 1 frame, VC: k)
    precede them. ``sigmas`` defaults to the ``schedule`` of ``cfg.steps`` and ``cfg.shift``; ``x_start``
    replaces pure noise as the starting point (the refiner starts from a noised upsampled video).
    ``neg_text`` defaults to the null text that training's text dropout uses.
    """
    B = text.shape[0]
    device = text.device
    if x_start is None:
        x_start = noise if noise is not None else torch.randn((B, *latent_shape), generator=generator, device=device)
    if sigmas is None:
        sigmas = sigma_schedule(cfg.steps, cfg.shift, kind=schedule)
    if uses_cfg(cfg.guidance) and neg_text is None:
        neg_text, neg_mask = null_text(text, text_mask)  # what training's text dropout uses
    denoiser = Denoiser(model, cond_latents, use_cache=use_cache)
    return denoise(denoiser, x_start, sigmas, text, text_mask, guidance=cfg.guidance, zero_star=cfg.cfg_zero_star,
                   neg_text=neg_text, neg_mask=neg_mask, step_rule=step_rule, generator=generator)
