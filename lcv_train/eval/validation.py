"""The flow-matching validation curve: the loss at fixed sigmas on a held-out set.

Deterministic and the same on every world size: sample ``i`` of the held-out set always gets the noise
drawn from ``(seed, i)``, whichever rank evaluates it; data-parallel rank ``r`` evaluates the samples with
``i % dp_size == r``; each sample's loss lands in slot ``i`` of a vector that is zero elsewhere, and one
all-reduce SUM (adding zeros is exact) gives every rank the same per-sample losses, which are then
averaged in index order. Only the first rank of each replica (cp and tp rank 0) fills its slots: the other
ranks of a replica ran the same samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from lcv_train.diffusion.flow_matching import add_noise, velocity_target


@dataclass
class ValSample:
    index: int  # position in the held-out set: what its noise is drawn from
    latents: torch.Tensor  # [C, T, H, W]
    text: torch.Tensor  # [L, D]
    text_mask: torch.Tensor  # [L] bool


def sample_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The fixed noise of held-out sample ``index`` (CPU, fp32; the same on every rank and run)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randn(tuple(shape), generator=gen)


def _batches(samples: list[ValSample], batch_size: int) -> list[list[ValSample]]:
    """Consecutive samples of the same latent shape, at most ``batch_size`` per batch."""
    out: list[list[ValSample]] = []
    for s in samples:
        if out and len(out[-1]) < batch_size and out[-1][0].latents.shape == s.latents.shape \
                and out[-1][0].text.shape == s.text.shape:
            out[-1].append(s)
        else:
            out.append([s])
    return out


@torch.no_grad()
def validation_loss(model, samples: list[ValSample], num_samples: int, sigmas: Sequence[float], seed: int, *,
                    dp_rank: int = 0, dp_size: int = 1, contributes: bool = True, batch_size: int = 8,
                    device: torch.device | str = "cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> dict[float, float]:
    """``{sigma: mean loss}`` over held-out samples ``0..num_samples-1``.

    ``samples`` are this rank's (``index % dp_size == dp_rank``); every rank calls this (the forward passes
    of FSDP and context parallelism are collective: ranks with fewer batches run padding batches).
    """
    mine = [s for s in samples if s.index % dp_size == dp_rank]
    batches = _batches(mine, batch_size)
    calls = len(batches) * len(sigmas)
    if dist.is_initialized():  # the same number of forward passes on every rank
        n = torch.tensor([calls], dtype=torch.long, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        padding = int(n) - calls
    else:
        padding = 0
    losses = torch.zeros(len(sigmas), num_samples, dtype=torch.float64, device=device)
    for batch in batches:
        x0 = torch.stack([s.latents for s in batch]).to(device).float()
        eps = torch.stack([sample_noise(s.latents.shape, seed, s.index) for s in batch]).to(device)
        text = torch.stack([s.text for s in batch]).to(device).float()
        mask = torch.stack([s.text_mask for s in batch]).to(device)
        for k, sigma in enumerate(sigmas):
            sig = torch.full((len(batch),), float(sigma), device=device)
            with autocast():
                v = model(add_noise(x0, eps, sig), sig * 1000.0, text, mask, num_cond_latents=0)
            err = (v.float() - velocity_target(x0, eps)).pow(2).flatten(1).mean(dim=1)
            if contributes:
                for s, e in zip(batch, err):
                    losses[k, s.index] = e.double()
    if padding:
        pad = batches[-1] if batches else None
        for _ in range(padding):
            if pad is None:  # this rank has no sample at all: any well-formed input will do
                raise RuntimeError("validation_loss: a rank without samples cannot pad (fewer samples than ranks)")
            x0 = torch.stack([s.latents for s in pad]).to(device).float()
            text = torch.stack([s.text for s in pad]).to(device).float()
            mask = torch.stack([s.text_mask for s in pad]).to(device)
            with autocast():
                model(x0, torch.full((len(pad),), 500.0, device=device), text, mask, num_cond_latents=0)
    if dist.is_initialized():
        dist.all_reduce(losses)
    return {float(s): float(losses[k].mean()) for k, s in enumerate(sigmas)}
