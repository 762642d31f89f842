"""Group rollouts for GRPO, independent of the model plumbing (SPEC section 6).

Per prompt, G samples start from the SAME initial noise and follow deterministic Euler (ODE) steps, except
at one critical step drawn per prompt from ``sde_window`` (the early, high-noise part of the schedule),
where ``sde.sde_step`` injects (truncated) noise. The group members are identical before that step and
differ only through it, so the reward differences are credited to it.

``v_fn(x, sigma)`` is the velocity in the published sign (``x0 - eps``) for a batch ``x`` [N, ...] at noise
levels ``sigma`` [N]; samples are ordered prompt-major (prompt p's group is rows ``p*G .. p*G+G-1``), so a
closure over the prompts' text embeddings (with CFG, the caller's business) knows which row is which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcv_train.rl.sde import sde_log_prob, sde_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Rollout:
    """One rollout batch of P prompts x G samples (rows prompt-major); what the GRPO update needs."""

    x: torch.Tensor           # [N, ...] latents entering the critical step
    x_next: torch.Tensor      # [N, ...] the sampled latents after it
    log_prob: torch.Tensor    # [N] log-probability of x_next under the rollout policy
    mean: torch.Tensor        # [N, ...] the step's Gaussian mean
    std: torch.Tensor         # [N, 1, ...] its (truncated) std
    sigma: torch.Tensor       # [N] noise level of the critical step
    sigma_next: torch.Tensor  # [N]
    step: torch.Tensor        # [N] long: index of the critical step in the schedule
    final: torch.Tensor       # [N, ...] final latents (sigma = sigmas[-1])
    group: torch.Tensor       # [N] long: prompt index of each row

    def log_prob_under(self, v: torch.Tensor, eta: float, std_max: float | None = None):
        """Log-probability of the stored ``x_next`` when the critical step's velocity is ``v`` (new
        parameters: ``v = v_fn_new(self.x, self.sigma)``). Returns ``(log_prob [N], mean, std)``."""
        _, mean, std, _ = sde_step(self.x, v, self.sigma, self.sigma_next, eta, noise=torch.zeros_like(self.x_next),
                                   std_max=std_max)
        return sde_log_prob(self.x_next, mean, std), mean, std


@torch.no_grad()
def rollout(v_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, group_size: int,
            sde_window: tuple[int, int], eta: float = 1.0, std_max: float | None = None,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample G = ``group_size`` latents per prompt from ``noise`` [P, ...] (one initial noise per prompt)
    along ``sigmas`` [S + 1] (decreasing), with one SDE step per prompt at an index drawn uniformly from
    ``sde_window = (start, stop)`` (``start <= i < stop``; ``sigmas[start] < 1``) by ``generator``, which also
    draws the SDE noise.
    """
    S = sigmas.numel() - 1
    start, stop = sde_window
    if not 0 <= start < stop <= S:
        raise ValueError(f"rollout: sde_window {sde_window} must satisfy 0 <= start < stop <= steps={S}")
    if float(sigmas[start]) >= 1.0:
        raise ValueError(f"rollout: sde_window starts at step {start} where sigma = {float(sigmas[start]):g}; the SDE "
                         f"step needs sigma < 1 (start the window at the first step with sigma < 1)")
    if group_size < 1:
        raise ValueError(f"rollout: group_size must be >= 1, got {group_size}")
    P, G = noise.shape[0], group_size
    device = noise.device
    group = torch.arange(P, device=device).repeat_interleave(G)
    gen_device = generator.device if generator is not None else None
    crit = torch.randint(start, stop, (P,), generator=generator, device=gen_device).to(device).repeat_interleave(G)
    x = noise.float().repeat_interleave(G, dim=0)
    sig = sigmas.to(device=device, dtype=torch.float32)
    shape = (-1,) + (1,) * (x.dim() - 1)
    saved = {}
    for i in range(S):
        s, s_next = sig[i], sig[i + 1]
        v = v_fn(x, s.expand(x.shape[0])).float()
        x_ode = x - (s_next - s) * v
        here = crit == i
        if bool(here.any()):
            n = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
            x_sde, mean, std, lp = sde_step(x, v, s, s_next, eta, noise=n, std_max=std_max)
            saved[i] = (x.clone(), x_sde, mean, std, lp)
            x = torch.where(here.view(shape), x_sde, x_ode)
        else:
            x = x_ode
    rows = torch.arange(x.shape[0], device=device)
    pick = lambda k: torch.stack([saved[int(crit[r])][k][r] for r in rows])  # noqa: E731
    return Rollout(x=pick(0), x_next=pick(1), mean=pick(2), std=pick(3), log_prob=pick(4),
                   sigma=sig[crit], sigma_next=sig[crit + 1], step=crit, final=x, group=group)
