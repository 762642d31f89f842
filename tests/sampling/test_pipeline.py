"""The sampler's parts on a random tiny DiT with the exactly invertible pixel codec: the three tasks, the
condition cache against the uncached path, the long-video stitching, the refiner and a LoRA pass."""

import dataclasses

import pytest
import torch

from lcv_train.sampling import Denoiser, denoise, sample, SamplerConfig
from lcv_train.sampling.pipeline import (GenerationConfig, encode_prompts, generate, generate_latents, long_video,
                                         pad_frames, refine, upsample_video)
from tests.sampling._kit import tiny_sampling_model

CFG = GenerationConfig(frames=5, height=8, width=8, steps=3, guidance=3.0, shift=3.0)


@pytest.fixture(scope="module")
def sm():
    return tiny_sampling_model()


def _video(frames, h=8, w=8, seed=0):
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_three_tasks_shapes_and_condition_frames_kept_exactly(sm):
    """I2V / VC: the condition frames come back bit for bit (latents, and pixels through the exact codec)."""
    p = encode_prompts(sm, ["a red circle moves to the right"], CFG.guidance)
    t2v = generate(sm, p, CFG, None, torch.Generator().manual_seed(0))
    assert t2v.shape == (1, 3, 5, 8, 8) and torch.isfinite(t2v).all()
    for cond in (_video(1), _video(3)):  # i2v, vc
        z = sm.codec.encode(cond)
        lat = generate_latents(sm, p, CFG, z, torch.Generator().manual_seed(0))
        assert lat.shape == (1, 16, 5, 4, 4) and torch.equal(lat[:, :, : z.shape[2]], z)
        out = generate(sm, p, CFG, cond, torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, 5, 8, 8)
        assert torch.equal(out[:, :, : cond.shape[2]], cond)
        assert not torch.equal(out[:, :, cond.shape[2]:], t2v[:, :, cond.shape[2]:])


def test_cached_and_uncached_condition_give_the_same_video(sm):
    """The condition K/V cache (computed once, reused by every step and both CFG branches) against running the
    condition frames through the model at every call: equal to 1e-5 of the largest value in fp32 after 3 guided steps (what
    remains is summation order). A cache that took its keys after RoPE, or let condition tokens see the
    text, differs by O(1)."""
    p = encode_prompts(sm, ["a blue square moves up"], CFG.guidance)
    z = sm.codec.encode(_video(3, seed=1))
    outs = [generate_latents(sm, p, dataclasses.replace(CFG, use_cache=c), z, torch.Generator().manual_seed(3))
            for c in (True, False)]
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * scale, ((outs[0] - outs[1]).abs().max(), scale)
    assert (outs[0] - generate_latents(sm, p, CFG, z * 0.5, torch.Generator().manual_seed(3))).abs().max() > 1e-2


def test_the_cache_is_computed_once_per_segment(sm, monkeypatch):
    calls = []
    real = sm.model.encode_condition
    monkeypatch.setattr(sm.model, "encode_condition", lambda c: calls.append(c.shape) or real(c))
    p = encode_prompts(sm, ["x"], CFG.guidance)
    video, clips = long_video(sm, p, CFG, segments=3, cond_frames=2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # segments 2 and 3 (the first is T2V); 3 steps x 2 branches each reuse it


def test_long_video_stitches_exactly(sm):
    """3 segments of 5 frames conditioned on the last 2: 5 + 2*3 = 11 frames; each later segment begins with
    exactly the video's last 2 frames so far, and the video holds each segment's new frames once."""
    p = encode_prompts(sm, ["a green triangle moves left"], CFG.guidance)
    video, clips = long_video(sm, p, CFG, segments=3, cond_frames=2, generator=torch.Generator().manual_seed(0))
    assert video.shape[2] == 5 + 2 * 3 and len(clips) == 3
    assert torch.equal(video[:, :, :5], clips[0])
    start = 5
    for prev_end, clip in zip((5, 8), clips[1:]):
        assert torch.equal(clip[:, :, :2], video[:, :, prev_end - 2:prev_end])  # the seam: the previous tail
        assert torch.equal(video[:, :, start:start + 3], clip[:, :, 2:])
        start += 3
    diffs = (video[:, :, 1:] - video[:, :, :-1]).abs().flatten(3).amax(dim=(0, 1, 3))
    assert (diffs > 0).all(), "a frame repeated at a seam"


def test_upsample_and_padding():
    v = _video(5, 4, 4)
    up = upsample_video(v, 8, 12)
    assert up.shape == (1, 3, 9, 8, 12)
    # the even frames are the resized originals, the odd ones the mean of their neighbours
    resized = torch.nn.functional.interpolate(v[0].permute(1, 0, 2, 3), size=(8, 12), mode="bilinear", align_corners=True)
    torch.testing.assert_close(up[0, :, ::2], resized.permute(1, 0, 2, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(up[0, :, 1::2], (up[0, :, 0:-1:2] + up[0, :, 2::2]) / 2, rtol=0, atol=1e-6)
    z, pad = pad_frames(torch.arange(5.0).view(1, 1, 5, 1, 1), 4)
    assert pad == 3 and z.flatten().tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    z, pad = pad_frames(torch.arange(2.0).view(1, 1, 2, 1, 1), 4, front=True)
    assert z.flatten().tolist() == [0, 0, 0, 1]


def test_refine_runs_with_bsa_and_keeps_the_i2v_frame(sm, monkeypatch):
    """Stage 1 (5 frames 8x8) -> 9 frames 16x16 with BSA on (12 latent frames after padding: whole 4-frame
    blocks), no CFG, 4 steps from 0.5 (the 10-step schedule's tail); the attention operator is restored."""
    from kernels.attention_op import BlockSparseAttentionOp

    seen = []
    real = BlockSparseAttentionOp.self_attention

    def spy(self, q, k, v, q_grid, kv_grid, clip_frames=None):
        seen.append(kv_grid)
        return real(self, q, k, v, q_grid, kv_grid, clip_frames)

    monkeypatch.setattr(BlockSparseAttentionOp, "self_attention", spy)
    p = encode_prompts(sm, ["a red circle moves to the right"], 1.0)
    assert p.neg_text is None
    stage1 = generate(sm, encode_prompts(sm, ["a red circle moves to the right"], CFG.guidance), CFG, None,
                      torch.Generator().manual_seed(0))
    op = sm.model.attention_op
    out = refine(sm, p, stage1, 16, 16, steps=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 9, 16, 16) and torch.isfinite(out).all()
    assert sm.model.attention_op is op
    assert seen and all(g[0] % 4 == 0 for g in seen)
    image = _video(1, 16, 16, seed=5)
    out = refine(sm, p, stage1, 16, 16, steps=10, cond_video=image, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 9, 16, 16) and torch.equal(out[:, :, :1], image)


def test_sample_keeps_the_trainers_call(sm):
    """``Trainer.write_sample`` calls ``sample(model, text, mask, (C, T, h, w), SamplerConfig, generator=...)``."""
    text, mask = sm.text_encoder.encode(["a"])
    out = sample(sm.model, text, mask, (16, 2, 4, 4), SamplerConfig(steps=2, shift=3.0, guidance=3.0),
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()


def test_sde_step_rule_plugs_into_the_loop(sm):
    """GRPO's rollouts reuse ``denoise`` with the SDE step at one critical step; the other steps are Euler."""
    from lcv_train.sampling import EulerStep, SDEStep, sigma_schedule

    text, mask = sm.text_encoder.encode(["a"])
    den = Denoiser(sm.model)
    x0 = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sig = sigma_schedule(4, 3.0)
    rule = SDEStep(eta=0.7, only_at={1})
    a = denoise(den, x0, sig, text, mask, step_rule=rule, generator=torch.Generator().manual_seed(1))
    b = denoise(den, x0, sig, text, mask, step_rule=EulerStep())
    assert [r[0] for r in rule.records] == [1] and not torch.equal(a, b)
    index, x_next, mean, std, log_prob = rule.records[0]
    assert torch.isfinite(log_prob).all() and (std > 0).all()
    # Vanishing noise gives the Euler step back: catches the velocity handed to sde_step with the wrong sign.
    c = denoise(den, x0, sig, text, mask, step_rule=SDEStep(eta=1e-6, only_at={1}),
                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c, b, rtol=0, atol=1e-3 * float(b.abs().max()))
