"""The critical SDE step of a flow-matching rollout and the Gaussian log-probability of its sample.

Sign convention: ``v`` is the network output in the PUBLISHED sign, ``v = x0 - eps``, for
``x = sigma * eps + (1 - sigma) * x0``; the ODE velocity along decreasing sigma is ``u = -v = eps - x0``
(SPEC section 6 writes the same step with the diffusers-sign ``u``). With
``g = eta * sqrt(sigma / (1 - sigma))`` and ``dt = sigma_next - sigma < 0``::

    mean = x + (u + g^2 / (2 sigma) * (x + (1 - sigma) u)) * dt
    std  = min(g * sqrt(|dt|), std_max)                        # the truncated noise
    x_next = mean + std * noise

``x + (1 - sigma) u`` is the model's estimate of ``eps``, so the extra drift is the score correction
that keeps the marginals of the ODE when noise of variance ``g^2 |dt|`` is injected. ``sigma`` must be
< 1 (``g`` is infinite at sigma = 1, the first step of a schedule that starts at pure noise).

Everything is computed in (at least) float32 and returned in that dtype, so a stored ``x_next`` gives
back exactly the log-probability it was sampled with (``sde_log_prob``).
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value, batch: int, dtype, device, ndim: int, name: str) -> torch.Tensor:
    """A float or [B] tensor -> [B, 1, 1, ...] broadcastable against a [B, ...] tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sde_step: {name} must be a float or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def sde_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of ``x_next`` under N(mean, std^2), averaged over every element of a sample: [B].

    ``std`` broadcasts against ``mean`` ([B, 1, ...] or a scalar). Use it to re-evaluate a stored sample
    under new parameters (the PPO ratio): recompute ``mean`` with ``sde_step(x, v_new, ...)`` and pass the
    stored ``x_next``.
    """
    dtype = torch.promote_types(torch.promote_types(mean.dtype, x_next.dtype), torch.float32)
    x_next, mean = x_next.to(dtype), mean.to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=mean.device)
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, eta: float,
             noise: torch.Tensor | None = None, std_max: float | None = None,
             generator: torch.Generator | None = None):
    """One SDE step from ``sigma`` to ``sigma_next``: returns ``(x_next, mean, std, log_prob)``.

    ``x``, ``v`` [B, ...] (``v`` in the published sign ``x0 - eps``); ``sigma``, ``sigma_next`` floats or
    [B] tensors with ``0 <= sigma_next < sigma < 1``; ``eta`` > 0 scales the injected noise; ``noise``
    (standard normal, like ``x``) is drawn from ``generator`` when None; ``std_max`` caps the std.
    ``mean`` and ``x_next`` are [B, ...], ``std`` is [B, 1, ...] (broadcastable), ``log_prob`` is [B].
    ``x_next`` is detached (a sample, not a function of the parameters), so ``log_prob`` is differentiable in
    ``v`` (and ``x``) through ``mean`` only; ``std`` depends on the schedule only.
    """
    if x.shape != v.shape:
        raise ValueError(f"sde_step: x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    if eta <= 0:
        raise ValueError(f"sde_step: eta must be > 0, got {eta}")
    if std_max is not None and std_max <= 0:
        raise ValueError(f"sde_step: std_max must be > 0 or None, got {std_max}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
    B, nd = x.shape[0], x.dim()
    s = _per_sample(sigma, B, dtype, x.device, nd, "sigma")
    s_next = _per_sample(sigma_next, B, dtype, x.device, nd, "sigma_next")
    if not bool(((s_next < s) & (s_next >= 0) & (s < 1)).all()):
        raise ValueError(f"sde_step: need 0 <= sigma_next < sigma < 1, got sigma={s.flatten().tolist()} "
                         f"sigma_next={s_next.flatten().tolist()}")
    x, u = x.to(dtype), -v.to(dtype)
    dt = s_next - s
    g = eta * torch.sqrt(s / (1 - s))
    mean = x + (u + g**2 / (2 * s) * (x + (1 - s) * u)) * dt
    std = g * torch.sqrt(-dt)
    if std_max is not None:
        std = std.clamp(max=std_max)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"sde_step: noise {tuple(noise.shape)} must have the shape of x {tuple(x.shape)}")
    x_next = (mean + std * noise.to(dtype)).detach()
    return x_next, mean, std, sde_log_prob(x_next, mean, std)
