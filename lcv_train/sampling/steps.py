"""Step rules: how one sampling step moves ``x`` from ``sigma`` to ``sigma_next`` given the velocity.

A step rule is a callable ``rule(x, u, sigma, sigma_next, generator) -> x_next`` on fp32 tensors, where
``u = eps - x0`` is the diffusers-sign velocity (the negated network output, SPEC section 3: the network
predicts ``x0 - eps``). ``sigma`` and ``sigma_next`` are Python floats.

- ``EulerStep``: the deterministic ODE step ``x + (sigma_next - sigma) * u`` (the published sampler).
- ``SDEStep``: the flow SDE step of SPEC section 6 (``lcv_train.rl.sde.sde_step``: mean, std and Gaussian
  log-probability), which GRPO's rollouts use at their critical step; ``only_at`` restricts it to some
  step indices (the rest are Euler), and every SDE step's ``(index, x_next, mean, std, log_prob)`` is kept
  in ``records`` for the policy update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class EulerStep:
    def __call__(self, x: torch.Tensor, u: torch.Tensor, sigma: float, sigma_next: float,
                 generator: torch.Generator | None = None, index: int = 0) -> torch.Tensor:
        return x + (sigma_next - sigma) * u


@dataclass
class SDEStep:
    eta: float = 1.0
    std_max: float | None = None
    only_at: set[int] | None = None  # step indices that are SDE steps (None: all)
    records: list[tuple] = field(default_factory=list)

    def __call__(self, x, u, sigma, sigma_next, generator=None, index: int = 0):
        if (self.only_at is not None and index not in self.only_at) or sigma >= 1.0:
            return x + (sigma_next - sigma) * u  # the SDE's g = eta*sqrt(s/(1-s)) is undefined at s = 1
        from lcv_train.rl.sde import sde_step

        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # sde_step takes the network's (published-sign) output v = x0 - eps = -u
        x_next, mean, std, log_prob = sde_step(x, -u, sigma, sigma_next, self.eta, noise=noise,
                                               std_max=self.std_max)
        self.records.append((index, x_next, mean, std, log_prob))
        return x_next


def build_step_rule(name: str, eta: float = 1.0, std_max: float | None = None):
    if name == "euler":
        return EulerStep()
    if name == "sde":
        return SDEStep(eta=eta, std_max=std_max)
    raise ValueError(f"step={name!r}: choose euler or sde")
