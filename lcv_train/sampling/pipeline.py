"""Pixels in, pixels out: T2V / I2V / VC clips, the long-video loop and the coarse-to-fine refiner
(SPEC sections 2, 4.6 and 9), on a ``SamplingModel`` (``load.py``: the DiT, its VAE and text encoder).

- ``generate``: one clip of ``frames`` frames. I2V / VC condition frames are VAE-encoded, kept exactly as
  latents in front of the generated ones (the sampler only ever touches the noisy frames), and the whole
  clip is decoded.
- ``long_video``: ``segments`` clips, each after the first conditioned on the last ``cond_frames`` frames
  of the video so far; the video grows by ``frames - cond_frames`` new frames per segment, so no frame is
  repeated or missing at a seam.
- ``refine``: per-frame bilinear resize to the target size, linear interpolation in time to twice the frame
  rate (``2F - 1`` frames, the ends kept, so ``F = 1 + 4k`` stays ``1 + 4k``), VAE encode,
  ``x = s0 * noise + (1 - s0) * z_up`` with ``s0 = 0.5``, the refine schedule with BSA on and no CFG.
  Latent frames are padded to a multiple of the BSA block's frames (repeating the last noisy / first
  condition frame) so blocks are whole, and the padding is dropped before decoding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from lcv_train.diffusion.refine import upsample_video  # training and inference upsample alike
from lcv_train.diffusion.flow_matching import null_text
from lcv_train.sampling.guidance import uses_cfg
from lcv_train.sampling.sampler import Denoiser, SamplerConfig, denoise
from lcv_train.sampling.schedules import refine_sigmas, sigma_schedule

TASKS = ("t2v", "i2v", "vc")


@dataclass
class GenerationConfig(SamplerConfig):
    """What one clip is: the sampler's steps, shift and guidance, plus size and schedule
    (``schedule=base|enhance_hf|distill``)."""

    frames: int = 93
    height: int = 480
    width: int = 832
    schedule: str = "base"
    use_cache: bool = True


@dataclass
class Prompts:
    """Encoded prompts and their negative branch (None when there is no CFG)."""

    text: torch.Tensor
    mask: torch.Tensor
    neg_text: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)


def encode_prompts(sm, captions: list[str], guidance: float, negative_prompt: str | None = None) -> Prompts:
    """Captions through the text encoder; the negative branch (only with CFG) is ``negative_prompt`` through
    the encoder too, or by default what the checkpoint's unconditional branch was trained on: ``""`` for
    published weights, training's null text for ours (``sm.null_negative``)."""
    text, mask = sm.text_encoder.encode(list(captions))
    p = Prompts(text.to(sm.device), mask.to(sm.device), captions=list(captions))
    if uses_cfg(guidance):
        if negative_prompt is None and sm.null_negative:
            p.neg_text, p.neg_mask = null_text(p.text, p.mask)
        else:
            n, m = sm.text_encoder.encode([negative_prompt or ""] * len(captions))
            p.neg_text, p.neg_mask = n.to(sm.device), m.to(sm.device)
    return p


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


@torch.no_grad()
def generate_latents(sm, prompts: Prompts, cfg: GenerationConfig, cond_latents: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, step_rule=None) -> torch.Tensor:
    """Latents of the whole clip, condition latents (exactly as given) first."""
    C, T, h, w = sm.codec.latent_shape(cfg.frames, cfg.height, cfg.width)
    Tc = 0 if cond_latents is None else cond_latents.shape[2]
    if Tc >= T:
        raise ValueError(f"{Tc} condition latent frames leave no frame to generate in frames={cfg.frames} "
                         f"({T} latent frames); raise frames or lower cond_frames")
    B = prompts.text.shape[0]
    x = _noise((B, C, T - Tc, h, w), generator, sm.device)
    sigmas = sigma_schedule(cfg.steps, cfg.shift, kind=cfg.schedule)
    den = Denoiser(sm.model, cond_latents, use_cache=cfg.use_cache)
    out = denoise(den, x, sigmas, prompts.text, prompts.mask, guidance=cfg.guidance, zero_star=cfg.cfg_zero_star,
                  neg_text=prompts.neg_text, neg_mask=prompts.neg_mask, step_rule=step_rule, generator=generator)
    return out if cond_latents is None else torch.cat([cond_latents.float(), out], dim=2)


@torch.no_grad()
def generate(sm, prompts: Prompts, cfg: GenerationConfig, cond_video: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One clip ``[B, 3, frames, H, W]`` in [-1, 1]; ``cond_video`` ``[B, 3, Fc, H, W]`` (I2V: Fc = 1) are its
    first frames."""
    cond = None if cond_video is None else sm.codec.encode(cond_video.to(sm.device))
    return sm.codec.decode(generate_latents(sm, prompts, cfg, cond, generator))


@torch.no_grad()
def long_video(sm, prompts: Prompts, cfg: GenerationConfig, segments: int, cond_frames: int = 13,
               first_cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               segment_cfg: GenerationConfig | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``segments`` clips stitched into one video of ``frames + (segments - 1) * (frames - cond_frames)``
    frames; returns the video and each segment's own clip. The first segment is T2V (or I2V / VC with
    ``first_cond``); the others are continuations with ``segment_cfg`` (default ``cfg``)."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    if not 0 < cond_frames < cfg.frames:
        raise ValueError(f"cond_frames={cond_frames} must be in [1, frames={cfg.frames})")
    sm.codec.latent_frames(cond_frames)  # the VAE can encode that many frames (1 + 4k for Wan)
    clip = generate(sm, prompts, cfg, first_cond, generator)
    video, clips = clip, [clip]
    for _ in range(segments - 1):
        clip = generate(sm, prompts, segment_cfg or cfg, video[:, :, -cond_frames:], generator)
        clips.append(clip)
        video = torch.cat([video, clip[:, :, cond_frames:]], dim=2)
    return video, clips


@contextlib.contextmanager
def attention_op(model, op):
    """Run ``model`` with another attention operator (the refiner's BSA), restoring the old one after."""
    old = model.attention_op
    model.attention_op = op
    try:
        yield model
    finally:
        model.attention_op = old


def bsa_op(model):
    """The block-sparse operator the model's config describes (``model.bsa``); context-parallel over the same
    group and mode when the model runs context parallel now."""
    from kernels.attention_op import BlockSparseAttentionOp

    b = model.config.bsa
    op = BlockSparseAttentionOp(b.sparsity, tuple(b.chunk_3d_shape_q), b.cdf_threshold, b.backend,
                                kv_block_shape=tuple(b.chunk_3d_shape_k), fp32_scores=b.fp32_scores)
    current = model.attention_op
    if getattr(current, "group", None) is not None and hasattr(current, "cp"):
        from parallel.context_parallel.ops import RingAttentionOp, make_context_parallel_op

        op = make_context_parallel_op(op, current.group, "ring" if isinstance(current, RingAttentionOp) else "ulysses")
    return op


def pad_frames(latents: torch.Tensor, multiple: int, front: bool = False) -> tuple[torch.Tensor, int]:
    """Repeat the last (``front``: first) latent frame up to a multiple of ``multiple``; returns the padding."""
    pad = -latents.shape[2] % multiple
    if not pad:
        return latents, 0
    edge = latents[:, :, :1] if front else latents[:, :, -1:]
    rep = edge.expand(-1, -1, pad, -1, -1)
    return (torch.cat([rep, latents], 2) if front else torch.cat([latents, rep], 2)), pad


@torch.no_grad()
def refine(sm, prompts: Prompts, video: torch.Tensor, height: int, width: int, steps: int = 50,
           shift: float | None = None, t_thresh: float = 0.5, cond_video: torch.Tensor | None = None,
           generator: torch.Generator | None = None, bsa: bool = True) -> torch.Tensor:
    """Coarse-to-fine: the stage-1 ``video`` ``[B, 3, F, h, w]`` -> ``[B, 3, 2F - 1, height, width]``.
    ``steps``/``shift`` are the regular schedule's whose sigmas below ``t_thresh`` follow it.
    ``cond_video`` (I2V / VC refinement): high-resolution condition frames ``[B, 3, Fc, height, width]``
    that replace the first upsampled frames; they are kept exactly."""
    up = upsample_video(video.to(sm.device), height, width)
    z = sm.codec.encode(up)
    Tc, cond = 0, None
    if cond_video is not None:
        cond = sm.codec.encode(cond_video.to(sm.device))
        Tc = cond.shape[2]
    z = z[:, :, Tc:]
    block_t = int(sm.model.config.bsa.chunk_3d_shape_q[0]) if bsa else 1
    z, pad = pad_frames(z, block_t)
    pad_c = 0
    if cond is not None:
        cond, pad_c = pad_frames(cond, block_t, front=True)
    sigmas = refine_sigmas(steps, sm.shift if shift is None else shift, t_thresh)
    s0 = float(sigmas[0])
    x = s0 * _noise(z.shape, generator, sm.device) + (1 - s0) * z
    ctx = attention_op(sm.model, bsa_op(sm.model)) if bsa else contextlib.nullcontext()
    with ctx:
        den = Denoiser(sm.model, cond, use_cache=True)
        x = denoise(den, x, sigmas, prompts.text, prompts.mask, guidance=1.0, generator=generator)
    if pad:
        x = x[:, :, : x.shape[2] - pad]
    if cond is not None:
        x = torch.cat([cond[:, :, pad_c:].float(), x], dim=2)
    return sm.codec.decode(x)
