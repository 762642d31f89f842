"""Group-relative advantages over several rewards (SPEC section 6, LongCat's normalisation).

For each reward model separately: the reward minus its group mean, divided by the LARGEST group standard
deviation (population std over the group) across all prompts of the batch, plus 1e-8; then the weighted
sum over rewards. One shared divisor per reward keeps a group whose members happen to agree (tiny std)
from getting huge advantages, and per-reward normalisation keeps one reward's scale from drowning the
others (the multi-reward guard against reward hacking).
"""

from __future__ import annotations

import torch

EPS = 1e-8


def group_advantages(rewards: torch.Tensor, weights) -> torch.Tensor:
    """``rewards`` [P, G, R] (prompts, group members, reward models), ``weights`` [R] -> advantages [P, G]."""
    if rewards.dim() != 3:
        raise ValueError(f"group_advantages: rewards must be [P, G, R], got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    w = torch.as_tensor(weights, dtype=r.dtype, device=r.device)
    if w.shape != (r.shape[2],):
        raise ValueError(f"group_advantages: weights must be [R={r.shape[2]}], got shape {tuple(w.shape)}")
    centred = r - r.mean(dim=1, keepdim=True)                     # [P, G, R]
    group_std = r.std(dim=1, correction=0)                        # [P, R], population std over G
    scale = group_std.amax(dim=0) + EPS                           # [R], the largest across the batch
    return (centred / scale * w).sum(dim=2)
