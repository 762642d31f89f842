"""The refinement expert's inputs (SPEC sections 4.6 and 9): what coarse-to-fine generation feeds the refiner.

Coarse-to-fine: the base model generates a 480p / 15 fps clip, then the refiner (a LoRA on the same model, BSA
on, no CFG) takes it to 720p / 30 fps. At inference the stage-1 frames are brought to the target size and frame
count by ``upsample_video``, VAE-encoded to ``z_up``, and denoised from ``x_s = t_s * noise + (1 - t_s) * z_up``
(``t_s = 0.5``, timestep 500) down to 0. Training makes that pair on the fly from a high-resolution clip ``x``,
the target: ``degrade_video`` plays stage 1's output (``x`` at the low resolution and frame rate),
``upsample_video`` brings it back exactly as inference does (``refine_input_video`` is the two), and
``make_refine_inputs`` builds the network's input, timestep and target.

Derivation, in the published convention (SPEC section 3: ``x_sigma = sigma * eps + (1 - sigma) * x0``, the
network at timestep ``1000 * sigma`` predicts ``v = x0 - eps``, and the sampler integrates ``dx/dsigma = -v``
from the first sigma down to 0). The refiner starts at ``x_s = t_s * eps + (1 - t_s) * z_up``, which is a point
of the ordinary path only if ``z_up = x0``. Flow matching along the straight line from ``x_s`` (at
``sigma = t_s``) to the target ``x0`` (at ``sigma = 0``)::

    x_sigma = x0 + (sigma / t_s) * (x_s - x0),        0 < sigma <= t_s.

Written as an ordinary path ``x_sigma = sigma * eps' + (1 - sigma) * x0``, its noise is
``eps' = x0 + (x_s - x0) / t_s`` (``= eps + z_up - x0`` at ``t_s = 1/2``): every point of the line is the
point of the published path with noise ``eps'`` at position ``sigma``. So the network is fed timestep
``1000 * sigma`` (500 at the start, as inference's first refine step) and its target is the published velocity

    v = x0 - eps' = (x0 - x_s) / t_s                  (= 2 * x0 - eps - z_up at t_s = 1/2),

the same at every sigma of the line, and ``-v = dx/dsigma``: the sampler's Euler steps with this ``v`` from
``x_s`` at ``t_s`` land exactly on ``x0`` (``tests/diffusion/test_refine.py``). With ``z_up = x0`` (nothing
degraded) it is the ordinary path and target ``x0 - eps``. Condition frames (I2V / VC) are the clean
high-resolution latents of ``x``, timestep 0, outside the loss, as in every other stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcv_train.diffusion.flow_matching import TrainingInputs


def _resize_frames(video: torch.Tensor, height: int, width: int, **kw) -> torch.Tensor:
    """Bilinear resize of every frame of ``[B, C, F, H, W]``."""
    B, C, Fr, H, W = video.shape
    if (H, W) == (height, width):
        return video
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    frames = F.interpolate(frames, size=(height, width), mode="bilinear", **kw)
    return frames.reshape(B, Fr, C, height, width).permute(0, 2, 1, 3, 4)


def upsample_video(video: torch.Tensor, height: int, width: int, frames: int | None = None) -> torch.Tensor:
    """The refiner's input video, as the published inference makes it: ``[B, C, F, h, w]`` ->
    ``[B, C, frames, height, width]`` (float32). Each frame is resized bilinearly (``align_corners=True``, as
    LongCat's ``generate_refine``), then the clip is interpolated trilinearly (``align_corners=True``) to
    ``frames`` (default ``2F - 1``: the first and last frames kept, one new frame midway between each pair,
    i.e. 15 -> 30 fps); over an unchanged frame size that is linear interpolation in time. Value range is
    whatever comes in ([-1, 1] or [0, 1]: both maps are linear)."""
    B, C, Fr, _, _ = video.shape
    frames = 2 * Fr - 1 if frames is None else frames
    if frames < 1:
        raise ValueError(f"upsample_video: frames must be >= 1, got {frames}")
    out = _resize_frames(video.float(), height, width, align_corners=True)
    if frames != Fr:
        out = F.interpolate(out, size=(frames, height, width), mode="trilinear", align_corners=True)
    return out


def degrade_video(video: torch.Tensor, spatial_factor: float, temporal_factor: int) -> torch.Tensor:
    """The clip at the low resolution and frame rate (what stage 1 would have generated): every
    ``temporal_factor``-th frame (the first kept), each resized bilinearly with antialiasing to
    ``round(H / spatial_factor) x round(W / spatial_factor)``. ``[B, C, F, H, W]`` -> float32
    ``[B, C, 1 + (F - 1) // temporal_factor, h, w]``. 720p/30 fps with factors 1.5 and 2: 480p/15 fps."""
    if spatial_factor < 1 or temporal_factor < 1:
        raise ValueError(f"degrade_video: factors must be >= 1, got spatial {spatial_factor}, temporal {temporal_factor}")
    H, W = video.shape[-2:]
    h, w = max(1, round(H / spatial_factor)), max(1, round(W / spatial_factor))
    low = video[:, :, ::temporal_factor].float()
    return _resize_frames(low, h, w, align_corners=False, antialias=True)


def refine_input_video(video: torch.Tensor, spatial_factor: float, temporal_factor: int) -> torch.Tensor:
    """``upsample_video(degrade_video(video))`` back to ``video``'s size and frame count: the refiner's
    training input in pixels. The frame count must be ``1 + temporal_factor * k`` so that the kept frames are
    the interpolation nodes (``2F - 1`` of inference for factor 2)."""
    Fr, H, W = video.shape[2:]
    if (Fr - 1) % temporal_factor:
        raise ValueError(f"refine_input_video: {Fr} frames is not 1 + {temporal_factor}k (the low frame rate "
                         f"keeps every {temporal_factor}th frame, first and last included)")
    return upsample_video(degrade_video(video, spatial_factor, temporal_factor), H, W, Fr)


def sample_refine_sigmas(batch: int, t_start: float, logit_mean: float = 0.0, logit_std: float = 1.0,
                         generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Positions on the refiner's line: ``t_start * sigmoid(N(logit_mean, logit_std))``, fp32 ``[batch]`` in
    ``(0, t_start)``, where the refine schedule's steps lie (t_start, then the base schedule below it)."""
    u = torch.randn(batch, generator=generator, device=device) * logit_std + logit_mean
    return t_start * torch.sigmoid(u)


def make_refine_inputs(x0: torch.Tensor, z_up: torch.Tensor, num_cond: int, sigma: torch.Tensor, eps: torch.Tensor,
                       t_start: float = 0.5) -> TrainingInputs:
    """The network's input, timestep and target for the refiner (see the module docstring).

    ``x0``: target latents ``[B, C, T, H, W]`` (condition frames first); ``z_up``: latents of the upsampled
    degraded clip, same shape (its condition frames are not used); ``sigma [B]`` in ``(0, t_start]``;
    ``eps``: noise, same shape. Returns ``noisy`` (clean condition frames, then ``x_sigma``), ``timestep``
    ``[B, T]`` (0 on condition frames, ``1000 * sigma`` after), ``target`` ``(x0 - x_s) / t_start`` of the
    noisy frames, ``sigma``. Computed in fp32 (or ``x0``'s wider dtype), returned in ``x0``'s dtype."""
    if z_up.shape != x0.shape or eps.shape != x0.shape:
        raise ValueError(f"make_refine_inputs: x0 {tuple(x0.shape)}, z_up {tuple(z_up.shape)} and eps "
                         f"{tuple(eps.shape)} must have one shape")
    if not 0 < t_start <= 1:
        raise ValueError(f"make_refine_inputs: t_start must be in (0, 1], got {t_start}")
    B, _, T = x0.shape[:3]
    k = num_cond
    ct = torch.promote_types(x0.dtype, torch.float32)
    target_x0 = x0[:, :, k:].to(ct)
    x_s = t_start * eps[:, :, k:].to(ct) + (1 - t_start) * z_up[:, :, k:].to(ct)
    s = (sigma.to(ct) / t_start).view(-1, 1, 1, 1, 1)
    x_sigma = target_x0 + s * (x_s - target_x0)
    noisy = torch.cat([x0[:, :, :k].to(ct), x_sigma], dim=2).to(x0.dtype)
    timestep = (sigma.float()[:, None] * 1000.0).expand(B, T).clone()
    timestep[:, :k] = 0.0
    target = ((target_x0 - x_s) / t_start).to(x0.dtype)
    return TrainingInputs(noisy, timestep, target, sigma)
