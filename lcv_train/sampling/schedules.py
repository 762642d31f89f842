"""Sigma schedules of the published inference pipeline (SPEC section 9), as closed forms.

Every schedule is a decreasing fp32 tensor of ``n + 1`` sigmas ending in 0: step ``i`` goes from
``sigmas[i]`` to ``sigmas[i + 1]``, its timestep is ``1000 * sigmas[i]``.

- ``base_sigmas``: ``linspace(1, 0.001, steps)``, shifted (``s*x / (1 + (s-1)*x)``), then 0.
- ``enhance_hf_sigmas``: the base schedule's sigmas above 0.5, then the uniform tail 0.5, 0.45, ..., 0.05,
  then 0 (video continuation in the published demo; 56 steps for 50 at shift 12).
- ``distill_sigmas``: the 50 values ``1000, 980, ..., 20``, at indices
  ``floor(linspace(0, 50, steps, endpoint=False))``, divided by 1000, then 0 (16 steps: the CFG/step
  distillation LoRA).
- ``refine_sigmas``: ``t_thresh`` (0.5), then the base schedule's sigmas below it, then 0 (the refiner).
"""

from __future__ import annotations

import math

import torch

from lcv_train.diffusion.flow_matching import shift_sigma

SCHEDULES = ("base", "enhance_hf", "distill", "refine")
DISTILL_GRID = 50  # the distillation LoRA was trained on the timesteps 20, 40, ..., 1000


def _with_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def _check_steps(steps: int, name: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: steps must be a positive integer, got {steps!r}")


def base_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` sigmas: ``linspace(1, 0.001, steps)`` shifted, then 0."""
    _check_steps(steps, "base schedule")
    return _with_zero(shift_sigma(torch.linspace(1.0, 0.001, steps, dtype=torch.float64), shift))


def enhance_hf_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The base schedule's sigmas above 0.5, then 0.5, 0.45, ..., 0.05, then 0."""
    base = base_sigmas(steps, shift)[:-1].double()
    tail = torch.arange(500, 0, -50, dtype=torch.float64) / 1000.0
    return _with_zero(torch.cat([base[base > 0.5], tail]))


def distill_sigmas(steps: int = 16) -> torch.Tensor:
    """``steps`` of the 50 distillation timesteps ``1000, 980, ..., 20`` (indices
    ``floor(linspace(0, 50, steps, endpoint=False))``) / 1000, then 0."""
    _check_steps(steps, "distill schedule")
    if steps > DISTILL_GRID:
        raise ValueError(f"distill schedule: at most {DISTILL_GRID} steps, got {steps}")
    grid = torch.arange(DISTILL_GRID, 0, -1, dtype=torch.float64) * (1000 // DISTILL_GRID)  # 1000 .. 20
    idx = [math.floor(i * DISTILL_GRID / steps) for i in range(steps)]
    return _with_zero(grid[idx] / 1000.0)


def refine_sigmas(steps: int, shift: float, t_thresh: float = 0.5) -> torch.Tensor:
    """``t_thresh``, then the base schedule's sigmas below it, then 0."""
    base = base_sigmas(steps, shift)[:-1].double()
    return _with_zero(torch.cat([torch.tensor([t_thresh], dtype=torch.float64), base[base < t_thresh]]))


def sigma_schedule(steps: int, shift: float, device=None, kind: str = "base") -> torch.Tensor:
    """The schedule ``kind`` names (``SCHEDULES``), on ``device``."""
    if kind == "base":
        s = base_sigmas(steps, shift)
    elif kind == "enhance_hf":
        s = enhance_hf_sigmas(steps, shift)
    elif kind == "distill":
        s = distill_sigmas(steps)
    elif kind == "refine":
        s = refine_sigmas(steps, shift)
    else:
        raise ValueError(f"schedule={kind!r}: choose one of {', '.join(SCHEDULES)}")
    return s.to(device) if device is not None else s
