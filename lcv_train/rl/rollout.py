"""Group rollouts for GRPO, independent of the model plumbing (SPEC section 6).

Per prompt, G samples start from the SAME initial noise and follow deterministic Euler (ODE) steps, except
at one critical step drawn per prompt from ``sde_window`` (the early, high-noise part of the schedule),
where ``sde.sde_step`` injects (truncated) noise. The group members are identical before that step and
differ only through it, so the reward differences are credited to it.

``v_fn(x, sigma)`` is the velocity in the published sign (``x0 - eps``) for a batch ``x`` [N, ...] at noise
levels ``sigma`` [N]; samples are ordered prompt-major (prompt p's group is rows ``p*G .. p*G+G-1``), so a
closure over the prompts' text embeddings (with CFG, the caller's business) knows which row is which.

Every random draw of prompt ``p`` (its critical step, its G SDE noises) comes from ``generator[p]`` when a
generator per prompt is given: ``prompt_generator(seed, batch_index, prompt_index)`` seeds one from the run
seed, the rollout batch and the prompt's index in the whole job's batch, so a prompt's rollout is the same
whichever data-parallel rank holds it (the caller draws the prompt's initial noise from it first).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
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


def prompt_generator(seed: int, batch_index: int, prompt_index: int) -> torch.Generator:
    """A CPU generator for one prompt of one rollout batch: seeded from (run seed, rollout batch index, the
    prompt's index in the job's global batch) only, so any rank, world size or device draws the same."""
    digest = hashlib.sha256(f"grpo/{seed}/{batch_index}/{prompt_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def prompt_line(seed: int, num_lines: int, position: int) -> int:
    """The line of a ``num_lines``-line prompts file for the job's ``position``-th prompt (rollout batch b,
    prompt k of the job's batch of K: position b * K + k). The file is read in passes, each pass every line
    once, in an order drawn for that pass from (seed, pass): every prompt gets the same share of the updates,
    and the line depends on these numbers only (no state to save, the same on any rank)."""
    return int(_pass_order(seed, num_lines, position // num_lines)[position % num_lines])


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, num_lines: int, pass_index: int) -> torch.Tensor:
    """One pass's order of the lines (kept for the pass's remaining prompts, and the next pass's first)."""
    digest = hashlib.sha256(f"grpo-prompts/{seed}/{pass_index}".encode()).digest()
    return torch.randperm(num_lines, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


@torch.no_grad()
def rollout(v_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, group_size: int,
            sde_window: tuple[int, int], eta: float = 1.0, std_max: float | None = None,
            generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Rollout:
    """Sample G = ``group_size`` latents per prompt from ``noise`` [P, ...] (one initial noise per prompt)
    along ``sigmas`` [S + 1] (decreasing), with one SDE step per prompt at an index drawn uniformly from
    ``sde_window = (start, stop)`` (``start <= i < stop``; ``sigmas[start] < 1``). ``generator``: one
    generator, or one per prompt (``prompt_generator``); prompt ``p`` draws its critical step and then its G
    SDE noises from its own (or the shared one, prompt after prompt).
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
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * P
    if len(gens) != P:
        raise ValueError(f"rollout: {len(gens)} generators for {P} prompts (one per prompt, or one for all)")
    crit_p, sde_noise = [], []
    for g in gens:  # prompt by prompt: its draws depend on its generator only
        gen_device = g.device if g is not None else None
        crit_p.append(torch.randint(start, stop, (1,), generator=g, device=gen_device).to(device))
        sde_noise.append(torch.randn((G, *noise.shape[1:]), generator=g, device=gen_device).to(device))
    crit = torch.cat(crit_p).repeat_interleave(G)
    sde_noise = torch.cat(sde_noise)  # [N, ...], prompt-major like the rows
    group = torch.arange(P, device=device).repeat_interleave(G)
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
            x_sde, mean, std, lp = sde_step(x, v, s, s_next, eta, noise=sde_noise, std_max=std_max)
            saved[i] = (x.clone(), x_sde, mean, std, lp)
            x = torch.where(here.view(shape), x_sde, x_ode)
        else:
            x = x_ode
    rows = torch.arange(x.shape[0], device=device)
    pick = lambda k: torch.stack([saved[int(crit[r])][k][r] for r in rows])  # noqa: E731
    return Rollout(x=pick(0), x_next=pick(1), mean=pick(2), std=pick(3), log_prob=pick(4),
                   sigma=sig[crit], sigma_next=sig[crit + 1], step=crit, final=x, group=group)
