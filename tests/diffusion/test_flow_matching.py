"""Flow matching and sampling against closed forms (SPEC section 3)."""

import math

import pytest
import torch

from lcv_train.diffusion import (FlowMatchingConfig, add_noise, flow_matching_loss, make_training_inputs,
                                 sample_sigmas, shift_for_tokens, shift_sigma, velocity_target)
from lcv_train.errors import ConfigError
from lcv_train.sampling import SamplerConfig, guided_velocity, sample, sigma_schedule


def test_add_noise_and_target_convention():
    x0 = torch.randn(2, 3, 4, 5, 5)
    eps = torch.randn_like(x0)
    sigma = torch.tensor([0.25, 0.9])
    xt = add_noise(x0, eps, sigma)
    torch.testing.assert_close(xt[1], 0.9 * eps[1] + 0.1 * x0[1])
    # The published network predicts x0 - eps, i.e. minus d(x_t)/d(sigma).
    torch.testing.assert_close(velocity_target(x0, eps), x0 - eps)
    d = 1e-3
    dxt = (add_noise(x0, eps, sigma + d) - add_noise(x0, eps, sigma - d)) / (2 * d)
    torch.testing.assert_close(-dxt, velocity_target(x0, eps), rtol=1e-3, atol=1e-3)


def test_per_frame_sigma():
    x0, eps = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 3, 2, 2)
    xt = add_noise(x0, eps, torch.tensor([[0.0, 0.5, 1.0]]))
    torch.testing.assert_close(xt[:, :, 0], x0[:, :, 0])
    torch.testing.assert_close(xt[:, :, 2], eps[:, :, 2])


def test_shift_closed_form():
    s = torch.tensor([0.0, 0.1, 0.5, 1.0])
    torch.testing.assert_close(shift_sigma(s, 3.0), 3 * s / (1 + 2 * s))
    assert shift_sigma(torch.tensor(0.5), 12.0) > 0.9  # toward high noise


def test_shift_grows_with_tokens():
    cfg = FlowMatchingConfig(shift_min=1.0, shift_max=12.0, shift_tokens_min=256, shift_tokens_max=37440)
    assert shift_for_tokens(10, cfg) == pytest.approx(1.0)
    assert shift_for_tokens(10**7, cfg) == pytest.approx(12.0)
    mid = (256 + 37440) / 2
    assert shift_for_tokens(int(mid), cfg) == pytest.approx(math.sqrt(12.0), rel=1e-3)


def test_logit_normal_statistics():
    cfg = FlowMatchingConfig(logit_mean=0.5, logit_std=0.8, shift_min=1.0, shift_max=1.0)
    s = sample_sigmas(20000, cfg, 1000, torch.Generator().manual_seed(0))
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean()) - 0.5) < 0.03
    assert abs(float(logit.std()) - 0.8) < 0.03


def test_loss_only_on_noisy_frames():
    target = torch.randn(2, 4, 3, 4, 4)
    v = torch.randn(2, 4, 5, 4, 4)
    loss = flow_matching_loss(v, target, num_cond=2)
    v2 = v.clone()
    v2[:, :, :2] += 100
    assert flow_matching_loss(v2, target, num_cond=2) == loss
    torch.testing.assert_close(loss, ((v[:, :, 2:] - target) ** 2).mean())


def test_training_inputs_keep_condition_clean():
    x0 = torch.randn(3, 4, 5, 4, 4)
    cfg = FlowMatchingConfig()
    ti = make_training_inputs(x0, 2, cfg, 100, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ti.noisy[:, :, :2], x0[:, :, :2])
    assert (ti.timestep[:, :2] == 0).all()
    torch.testing.assert_close(ti.timestep[:, 2:], (ti.sigma[:, None] * 1000).expand(3, 3))
    assert ti.target.shape == (3, 4, 3, 4, 4)
    # The target is x0 - eps for the eps that made the noisy frames.
    s = ti.sigma.view(-1, 1, 1, 1, 1)
    eps = (ti.noisy[:, :, 2:] - (1 - s) * x0[:, :, 2:]) / s
    torch.testing.assert_close(ti.target, x0[:, :, 2:] - eps, rtol=1e-4, atol=1e-4)


def test_condition_noise_is_small_and_optional():
    x0 = torch.randn(8, 4, 3, 4, 4)
    ti = make_training_inputs(x0, 1, FlowMatchingConfig(cond_noise_max=0.05), 100, torch.Generator().manual_seed(1))
    diff = (ti.noisy[:, :, :1] - x0[:, :, :1]).abs()
    assert diff.max() > 0 and diff.max() < 0.05 * (x0.abs().max() + 6)
    assert (ti.timestep[:, :1] == 0).all()


def test_config_validation():
    with pytest.raises(ConfigError, match="diffusion.logit_std"):
        FlowMatchingConfig(logit_std=0).validate()


def test_euler_sampler_with_the_exact_velocity_recovers_the_data_point():
    """For a one-point data distribution the true velocity is known in closed form; with the published
    sign, Euler integration from pure noise lands on the point (straight paths are exact)."""
    x_star = torch.randn(1, 4, 2, 4, 4)

    class Oracle(torch.nn.Module):
        def forward(self, x, t, text, text_mask=None, num_cond_latents=0, cond_cache=None):
            s = (t / 1000).view(-1, 1, 1, 1, 1)
            eps = (x - (1 - s) * x_star) / s
            return x_star - eps

        def encode_condition(self, c):
            return None

    out = sample(Oracle(), torch.zeros(1, 3, 8), None, (4, 2, 4, 4), SamplerConfig(steps=7, shift=3.0, guidance=1.0),
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_star, rtol=1e-4, atol=1e-4)


def test_sigma_schedule_and_guidance():
    s = sigma_schedule(10, 3.0)
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    vc, vu = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(guided_velocity(vc, vu, 4.0, False), vu + 4 * (vc - vu))
    # CFG-Zero*: the unconditional branch is projected onto the conditional one.
    st = (vc * vu).sum((1, 2), keepdim=True) / (vu * vu).sum((1, 2), keepdim=True)
    torch.testing.assert_close(guided_velocity(vc, vu, 4.0, True), st * vu + 4 * (vc - st * vu))


def test_text_dropout_replaces_whole_samples_by_the_null_text():
    """Rate and form of caption dropout. The count of dropped captions of n = 4000 at rate 0.25 must lie
    within 4 binomial standard deviations (rates 0.225..0.275): a planted rate of 0.15 or 0.35, or a
    comparison that drops with probability 1 - p, fails (the seed is fixed, so the test is deterministic)."""
    from lcv_train.diffusion import drop_text, null_text

    n, p = 4000, 0.25
    text, mask = torch.randn(n, 5, 8), torch.ones(n, 5, dtype=torch.bool)
    t2, m2 = drop_text(text, mask, p, torch.Generator().manual_seed(0))
    nt, nm = null_text(text, mask)
    dropped = (t2 == 0).all(dim=(1, 2))
    sd = math.sqrt(n * p * (1 - p))
    lo, hi = n * p - 4 * sd, n * p + 4 * sd
    assert hi < n * 0.35 - 4 * math.sqrt(n * 0.35 * 0.65) and lo > n * 0.15 + 4 * math.sqrt(n * 0.15 * 0.85)
    assert lo <= int(dropped.sum()) <= hi, int(dropped.sum())
    assert torch.equal(m2[dropped], nm[dropped]) and torch.equal(t2[~dropped], text[~dropped])
    assert torch.equal(m2[~dropped], mask[~dropped])
    assert nm[:, 0].all() and not nm[:, 1:].any()
    assert drop_text(text, mask, 0.0)[0] is text
    assert (drop_text(text, mask, 1.0)[0] == 0).all()


def _logit_normal_median(logit_mean: float) -> float:
    return 1 / (1 + math.exp(-logit_mean))


def test_sample_sigmas_median_is_the_shifted_logit_normal_median():
    """The shift is applied by ``sample_sigmas``: with logit mean 0.3 (median m = sigmoid(0.3)) and a
    sequence past ``shift_tokens_max`` (shift s = shift_max = 5), the median sigma is s*m / (1 + (s-1)*m)
    = 0.871 (the unshifted median is 0.574). Catches: the shift dropped from ``sample_sigmas`` (or applied
    with 1/s)."""
    cfg = FlowMatchingConfig(logit_mean=0.3, logit_std=1.0, shift_min=1.0, shift_max=5.0, shift_tokens_min=256,
                             shift_tokens_max=1024)
    s, m = 5.0, _logit_normal_median(0.3)
    sig = sample_sigmas(4000, cfg, 5000, torch.Generator().manual_seed(0))
    # the sample median's standard deviation here is ~0.002
    assert float(sig.median()) == pytest.approx(s * m / (1 + (s - 1) * m), abs=0.01)
    assert ((sig > 0) & (sig < 1)).all()


def test_training_timesteps_use_the_shift_of_the_noisy_token_count():
    """Through the flow-matching stage (what the trainer calls): timesteps are 1000 * sigma with the
    shift of the *noisy* tokens only. Anchors 8 -> shift 1 and 32 -> shift 4, log-linear between; the
    batch has 1 condition + 1 noisy frame of 4 x 4 patches = 16 noisy tokens, so s = 4 ** (1/3), and the
    median timestep is 1000 * s*m / (1 + (s-1)*m) with m = 0.5. Catches: counting condition frames as
    noisy (s = 4), the shift dropped (s = 1), timesteps not scaled by 1000."""
    from types import SimpleNamespace

    from lcv_train.model import preset
    from lcv_train.stages import StageBatch, StageConfig, build_stage

    dcfg = FlowMatchingConfig(shift_min=1.0, shift_max=4.0, shift_tokens_min=8, shift_tokens_max=32, text_dropout=0.0)
    stage = build_stage(StageConfig(name="video_pretrain"), SimpleNamespace(diffusion=dcfg, model=preset("tiny")))
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, text_mask=None, num_cond_latents=0):
            seen["t"], seen["x"] = t, x
            return torch.zeros_like(x)

    B = 4000
    x0 = torch.randn(B, 16, 2, 8, 8)
    stage.loss(Recorder(), StageBatch(x0, torch.randn(B, 3, 32), torch.ones(B, 3, dtype=torch.bool), 1),
               torch.Generator().manual_seed(0))
    t = seen["t"]
    assert (t[:, 0] == 0).all()
    s, m = 4.0 ** (1 / 3), 0.5
    assert float(t[:, 1].median()) == pytest.approx(1000 * s * m / (1 + (s - 1) * m), abs=20)  # sd ~5
