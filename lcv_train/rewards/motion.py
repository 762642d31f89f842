"""``motion``: how much a video moves, from frame differences alone (no weights).

Score = mean over consecutive frame pairs and pixels of ``|frame[t+1] - frame[t]|``, pixels in [0, 1]
(so 0 for a still video, at most 1). A weights-free reward that pushes against the static videos other
rewards tolerate; pair it with a quality reward, since noise also moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcv_train.rewards.base import VideoScorer, register_scorer


@register_scorer("motion")
class MotionMagnitude(VideoScorer):
    name = "motion"

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"motion: videos must be [B, 3, F, H, W], got shape {tuple(videos.shape)}")
        if videos.shape[2] < 2:
            return torch.zeros(videos.shape[0], dtype=torch.float32)
        v = videos.float() / 2                                   # [-1, 1] -> differences in [0, 1] pixel units
        return (v[:, :, 1:] - v[:, :, :-1]).abs().flatten(1).mean(1).cpu()
