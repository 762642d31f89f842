"""The GRPO loss on the critical SDE step, with LongCat's timestep reweighting (SPEC section 6).

Per sample, with ``ratio = exp(log_prob - old_log_prob)`` (log-probabilities of the stored critical-step
sample, ``sde.sde_log_prob``) and advantage ``A``::

    policy = max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))     # PPO-clipped
    kl     = mean over elements of (mean - mean_ref)^2 / (2 std^2)                # to the reference policy
    w      = sqrt(sigma / (1 - sigma)) / sqrt(|dt|),   dt = sigma_next - sigma
    loss   = batch mean of  w * policy + kl_beta * w^2 * kl

The KL is averaged over elements like the log-probability is, so ``kl_beta`` does not depend on the
video size. ``w`` cancels the ``sqrt(|dt|) / g`` that the step's gradient carries and ``w^2`` the
``|dt| / g^2`` of the KL, so neither term's size depends on the timestep or the step size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def timestep_weight(sigma, sigma_next) -> torch.Tensor:
    """LongCat's ``w = sqrt(sigma / (1 - sigma)) / sqrt(|sigma_next - sigma|)`` (floats or [B] tensors)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    return (torch.sqrt(s / (1 - s)) / torch.sqrt((s_next - s).abs())).float()


# What a batch of critical steps contributes to the logged figures, as one float64 vector: sums (so the rows
# of several ranks or chunks add up) and extremes. ``grpo_metrics`` turns rows of these into the figures.
STATS = ("count", "loss", "policy_loss", "kl", "clipped", "ratio", "ratio_min", "ratio_max", "advantage",
         "advantage_sq", "advantage_abs_max", "weight", "log_ratio_abs_max")
_MIN, _MAX = {"ratio_min"}, {"ratio_max", "advantage_abs_max", "log_ratio_abs_max"}


def grpo_metrics(stats: torch.Tensor) -> dict[str, float]:
    """The figures of the samples behind ``stats`` [n, len(STATS)] (one row per rank or chunk, or [len(STATS)]):
    means over every sample (loss, policy loss, KL, clip fraction, ratio and advantage means, advantage
    population std, the weight), ratio min/max, advantage abs max, and ``log_ratio_abs_max`` (the largest
    |log_prob - old_log_prob|: on a rollout's first update, how far the recomputed log-prob drifted)."""
    rows = stats.detach().double().cpu().reshape(-1, len(STATS))
    col = {name: rows[:, i] for i, name in enumerate(STATS)}
    red = {k: float(v.min() if k in _MIN else v.max() if k in _MAX else v.sum()) for k, v in col.items()}
    n = red["count"]
    mean = {k: red[k] / n for k in ("loss", "policy_loss", "kl", "clipped", "ratio", "advantage", "advantage_sq",
                                    "weight")}
    return {"loss": mean["loss"], "policy_loss": mean["policy_loss"], "kl": mean["kl"],
            "clip_fraction": mean["clipped"], "ratio_mean": mean["ratio"], "ratio_min": red["ratio_min"],
            "ratio_max": red["ratio_max"], "advantage_mean": mean["advantage"],
            "advantage_std": max(mean["advantage_sq"] - mean["advantage"] ** 2, 0.0) ** 0.5,
            "advantage_abs_max": red["advantage_abs_max"], "weight_mean": mean["weight"],
            "log_ratio_abs_max": red["log_ratio_abs_max"]}


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor                 # scalar, to backpropagate
    stats: torch.Tensor                # [len(STATS)] float64 on the loss's device: this batch's share of the figures

    @property
    def metrics(self) -> dict[str, float]:
        """Clip fraction, ratio mean/min/max, KL, advantage stats, the terms: ``grpo_metrics`` of this batch."""
        return grpo_metrics(self.stats)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              sigma, sigma_next, *, clip_range: float, kl_beta: float = 0.0,
              mean: torch.Tensor | None = None, mean_ref: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> GRPOLossOutput:
    """The loss of a batch of critical steps; all per-sample inputs are [B] (``mean``/``mean_ref`` [B, ...]).

    ``log_prob`` carries the gradient (new parameters), ``old_log_prob`` and ``advantages`` are constants
    from the rollout. ``sigma``/``sigma_next`` are the critical step's (floats or [B]). The KL term needs
    ``mean`` (new), ``mean_ref`` (reference policy, no gradient) and ``std`` (the step's std) and is
    skipped when ``kl_beta`` is 0.
    """
    B = log_prob.shape[0]
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        if t.shape != (B,):
            raise ValueError(f"grpo_loss: {name} must be [B={B}], got shape {tuple(t.shape)}")
    if clip_range <= 0:
        raise ValueError(f"grpo_loss: clip_range must be > 0, got {clip_range}")
    lp = log_prob.float()
    adv = advantages.detach().float().to(lp.device)
    w = timestep_weight(sigma, sigma_next).to(lp.device).expand(B)
    ratio = torch.exp(lp - old_log_prob.detach().float().to(lp.device))
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    policy = torch.maximum(-adv * ratio, -adv * clipped)                       # [B]
    loss_per_sample = w * policy
    kl = torch.zeros(B, device=lp.device)
    if kl_beta != 0.0:
        if mean is None or mean_ref is None or std is None:
            raise ValueError("grpo_loss: kl_beta != 0 needs mean, mean_ref and std")
        std_b = torch.as_tensor(std, dtype=torch.float32, device=lp.device)
        kl = ((mean.float() - mean_ref.detach().float()) ** 2 / (2 * std_b**2)).flatten(1).mean(1)
        loss_per_sample = loss_per_sample + kl_beta * w**2 * kl
    loss = loss_per_sample.mean()
    with torch.no_grad():
        r, log_r = ratio.detach(), (lp - old_log_prob.detach().float().to(lp.device)).detach()
        d = lambda t: t.double()  # noqa: E731
        parts = {"count": torch.tensor(float(B), dtype=torch.float64, device=lp.device),
                 "loss": d(loss_per_sample).sum(), "policy_loss": d(w * policy).sum(), "kl": d(kl).sum(),
                 "clipped": d((r - 1).abs() > clip_range).sum(), "ratio": d(r).sum(), "ratio_min": d(r.min()),
                 "ratio_max": d(r.max()), "advantage": d(adv).sum(), "advantage_sq": d(adv**2).sum(),
                 "advantage_abs_max": d(adv.abs().max()), "weight": d(w).sum(),
                 "log_ratio_abs_max": d(log_r.abs().max())}
        stats = torch.stack([parts[k] for k in STATS])
    return GRPOLossOutput(loss, stats)
