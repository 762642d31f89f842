"""Classifier-free guidance (SPEC section 9): CFG, and CFG-Zero*'s per-sample rescaling of the
unconditional branch, ``st = <c, u> / (|u|^2 + 1e-8)``, ``v = u*st + g*(c - u*st)``.

The velocities passed here cover the noisy frames only (the sampler never guides condition frames), so
the inner products are over the noisy frames only. Guidance runs only when ``guidance > 1``.
"""

from __future__ import annotations

import torch


def uses_cfg(guidance: float) -> bool:
    return guidance > 1.0


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float, zero_star: bool) -> torch.Tensor:
    """``v_u + g * (v_c - v_u)``, with ``v_u`` first scaled per sample by CFG-Zero*'s ``st`` when ``zero_star``."""
    if zero_star:
        dims = tuple(range(1, v_cond.dim()))
        st = (v_cond * v_uncond).sum(dims, keepdim=True) / (v_uncond.pow(2).sum(dims, keepdim=True) + 1e-8)
        v_uncond = v_uncond * st
    return v_uncond + guidance * (v_cond - v_uncond)
