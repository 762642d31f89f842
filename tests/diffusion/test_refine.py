"""The refiner's inputs (``lcv_train.diffusion.refine``) against closed forms: the target and timestep of the
line from the noised upsampled video to the target, the degradation, and the inference-side upsampling."""

from __future__ import annotations

import pytest
import torch

from lcv_train.diffusion import (add_noise, degrade_video, make_refine_inputs, refine_input_video,
                                 sample_refine_sigmas, upsample_video, velocity_target)
from lcv_train.sampling import sigma_schedule


def _latents(seed=0, shape=(2, 4, 5, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def test_refine_target_and_timestep_closed_form():
    """At t_s = 1/2 the network's input at sigma = 1/2 is ``0.5 eps + 0.5 z_up`` (what inference starts from)
    at timestep 500, and its target is ``2 x0 - eps - z_up`` at every sigma; condition frames stay the clean
    target at timestep 0. Catches: the diffusers sign (``eps - x0``), a target of the ordinary path
    (``x0 - eps``), the wrong timestep scale, noised or upsampled condition frames."""
    x0, z_up, eps = _latents()
    k = 2
    sigma = torch.tensor([0.5, 0.2], dtype=torch.float64)
    inp = make_refine_inputs(x0, z_up, k, sigma, eps, t_start=0.5)
    torch.testing.assert_close(inp.noisy[0, :, k:], 0.5 * eps[0, :, k:] + 0.5 * z_up[0, :, k:], rtol=0, atol=1e-12)
    torch.testing.assert_close(inp.noisy[:, :, :k], x0[:, :, :k], rtol=0, atol=0)
    torch.testing.assert_close(inp.target, 2 * x0[:, :, k:] - eps[:, :, k:] - z_up[:, :, k:], rtol=0, atol=1e-12)
    assert torch.equal(inp.timestep, torch.tensor([[0, 0, 500, 500, 500], [0, 0, 200, 200, 200]], dtype=torch.float32))
    # sigma = 0.2 is 2/5 of the way from x0 to x_s
    x_s = 0.5 * eps + 0.5 * z_up
    torch.testing.assert_close(inp.noisy[1, :, k:], (0.6 * x0 + 0.4 * x_s)[1, :, k:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("t_start", [0.5, 0.3, 1.0])
def test_the_refine_line_is_a_published_path_and_the_sampler_lands_on_the_target(t_start):
    """The line is the published path ``sigma eps' + (1 - sigma) x0`` with ``eps' = x0 + (x_s - x0)/t_s``, with
    target ``x0 - eps'``; Euler steps of the sampler's rule ``x <- x - (s' - s) v`` from ``x_s`` at ``t_s`` with that
    target (the refine schedule: ``t_s``, then the 50-step shift-12 sigmas below it) land on ``x0`` and pass
    through the training inputs. With ``z_up = x0`` it is ordinary flow matching."""
    x0, z_up, eps = _latents(1)
    B = x0.shape[0]
    x_s = t_start * eps + (1 - t_start) * z_up
    eps_eff = x0 + (x_s - x0) / t_start
    base = sigma_schedule(50, 12.0).double()  # the refine schedule (SPEC 9): t_s, then the base sigmas below it
    sigmas = torch.cat([torch.tensor([t_start], dtype=torch.float64), base[base < t_start]])
    assert len(sigmas) >= 3 and sigmas[-1] == 0
    x = x_s.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        inp = make_refine_inputs(x0, z_up, 0, torch.full((B,), float(s), dtype=torch.float64), eps, t_start)
        torch.testing.assert_close(inp.noisy, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(inp.noisy, add_noise(x0, eps_eff, inp.sigma), rtol=0, atol=1e-6)
        torch.testing.assert_close(inp.target, velocity_target(x0, eps_eff), rtol=0, atol=1e-12)
        assert torch.allclose(inp.timestep, (1000 * s).float().expand_as(inp.timestep))
        x = x - (s_next - s) * inp.target
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)

    sigma = torch.tensor([0.9 * t_start, 0.1 * t_start], dtype=torch.float64)
    plain = make_refine_inputs(x0, x0, 0, sigma, eps, t_start)
    torch.testing.assert_close(plain.noisy, add_noise(x0, eps, sigma), rtol=0, atol=1e-6)  # add_noise: fp32
    torch.testing.assert_close(plain.target, velocity_target(x0, eps), rtol=0, atol=1e-12)


def test_refine_sigmas_lie_below_t_start():
    g = torch.Generator().manual_seed(0)
    s = sample_refine_sigmas(4096, 0.5, 0.0, 1.0, generator=g)
    assert s.min() > 0 and s.max() < 0.5 and abs(float(s.median()) - 0.25) < 0.02


def _linear_video(F, H, W, a=(0.7, -0.4, 0.3), c=0.1):
    """``a_t * t/(F-1) + a_h * y/(H-1) + a_w * x/(W-1) + c``: bilinear and trilinear interpolation with
    ``align_corners=True`` reproduce it exactly on any grid."""
    t = torch.linspace(0, 1, F).view(F, 1, 1) if F > 1 else torch.zeros(1, 1, 1)
    y, x = torch.linspace(0, 1, H).view(1, H, 1), torch.linspace(0, 1, W).view(1, 1, W)
    v = a[0] * t + a[1] * y + a[2] * x + c
    return v.expand(F, H, W)[None, None].expand(2, 3, F, H, W).contiguous()


def test_upsample_video_is_inference_bilinear_then_linear_in_time():
    """Catches: ``align_corners=False`` (a linear ramp would not stay exact), frames not kept at the even
    positions of ``2F - 1``, time interpolated before the resize or height and width swapped."""
    low = _linear_video(4, 6, 10)
    up = upsample_video(low, 11, 19)
    assert up.shape == (2, 3, 7, 11, 19) and up.dtype == torch.float32
    torch.testing.assert_close(up, _linear_video(7, 11, 19), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1, 3, 3, 4, 4, generator=g)
    up = upsample_video(v, 4, 4)
    torch.testing.assert_close(up[:, :, ::2], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(up[:, :, 1::2], (v[:, :, 1:] + v[:, :, :-1]) / 2, rtol=0, atol=1e-6)
    assert upsample_video(v[:, :, :1], 8, 8).shape == (1, 3, 1, 8, 8)  # an image stays one frame
    assert upsample_video(v, 4, 4, frames=3).equal(v)


def test_degrade_video_and_refine_input_video():
    """The low clip keeps frames 0, k, 2k, ... at 1/f the size; upsampled back, a clip linear in time and
    constant in space comes back exactly (the kept frames are the interpolation nodes). Catches an off-by-one
    in the frames kept or an upsampling that does not undo the frame-rate reduction's grid."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, 9, 24, 36, generator=g) * 2 - 1
    low = degrade_video(v, 1.5, 2)
    assert low.shape == (2, 3, 5, 16, 24)
    const = torch.full((1, 3, 5, 12, 12), 0.25)
    torch.testing.assert_close(degrade_video(const, 1.5, 2), torch.full((1, 3, 3, 8, 8), 0.25))
    same_size = degrade_video(v, 1.0, 3)
    torch.testing.assert_close(same_size, v[:, :, ::3], rtol=0, atol=1e-6)

    ramp = _linear_video(9, 24, 36, a=(0.8, 0.0, 0.0))
    torch.testing.assert_close(refine_input_video(ramp, 1.5, 2), ramp, rtol=0, atol=1e-5)
    out = refine_input_video(v, 1.5, 2)
    assert out.shape == v.shape
    assert 0 < (out - v).abs().mean() < 0.5  # degraded: close, not equal
    with pytest.raises(ValueError, match=r"8 frames is not 1 \+ 2k"):
        refine_input_video(v[:, :, :8], 1.5, 2)
