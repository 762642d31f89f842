"""The GRPO formulas (lcv_train.rl) against hand-written references: sde_step, group_advantages, grpo_loss."""

import math

import numpy as np
import pytest
import torch

from lcv_train.rl import group_advantages, grpo_loss, sde_log_prob, sde_step, timestep_weight


def _reference_step(x, v, sigma, sigma_next, eta, noise, std_max=None):
    """SPEC section 6 in the diffusers sign, written out element by element in float64 numpy."""
    x, v, noise = (t.double().numpy() for t in (x, v, noise))
    u = -v                                                    # published v = x0 - eps; diffusers u = eps - x0
    out_mean, out_std = np.empty_like(x), []
    for b in range(x.shape[0]):
        s, sn = float(sigma[b]), float(sigma_next[b])
        dt = sn - s
        g = eta * math.sqrt(s / (1 - s))
        out_mean[b] = x[b] + (u[b] + g * g / (2 * s) * (x[b] + (1 - s) * u[b])) * dt
        std = g * math.sqrt(abs(dt))
        out_std.append(min(std, std_max) if std_max is not None else std)
    std = np.array(out_std).reshape(-1, 1, 1, 1)
    return out_mean, std, out_mean + std * noise


def test_sde_step_mean_std_sample_against_reference():
    torch.manual_seed(0)
    x, v, noise = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    sigma, sigma_next = torch.tensor([0.95, 0.6, 0.3]), torch.tensor([0.9, 0.45, 0.0])
    x_next, mean, std, lp = sde_step(x, v, sigma, sigma_next, eta=0.7, noise=noise)
    ref_mean, ref_std, ref_next = _reference_step(x, v, sigma, sigma_next, 0.7, noise)
    torch.testing.assert_close(mean.double(), torch.from_numpy(ref_mean), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), torch.from_numpy(ref_std), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_next.double(), torch.from_numpy(ref_next), rtol=1e-5, atol=1e-5)
    # Log-prob: torch.distributions.Normal, averaged over the elements of each sample.
    ref_lp = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double()).flatten(1).mean(1)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    assert lp.shape == (3,)


def test_sde_step_published_sign_mean_is_ode_step_plus_score_term():
    """Catches a sign slip between the published v (x0 - eps) and the diffusers u: with eta -> 0 the mean is
    the sampler's Euler step x - (sigma_next - sigma) * v."""
    torch.manual_seed(1)
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    _, mean, std, _ = sde_step(x, v, 0.7, 0.5, eta=1e-4, noise=torch.zeros(2, 8))
    torch.testing.assert_close(mean, x - (0.5 - 0.7) * v, rtol=0, atol=1e-6)
    # With float sigmas the result equals the [B]-tensor form.
    out_f = sde_step(x, v, 0.7, 0.5, eta=0.9, noise=torch.ones(2, 8))
    out_t = sde_step(x, v, torch.tensor([0.7, 0.7]), torch.tensor([0.5, 0.5]), eta=0.9, noise=torch.ones(2, 8))
    for a, b in zip(out_f, out_t):
        torch.testing.assert_close(a, b)


def test_sde_step_truncation_caps_std_only_where_it_exceeds():
    torch.manual_seed(2)
    x, v, noise = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    sigma, sigma_next = torch.tensor([0.98, 0.2]), torch.tensor([0.9, 0.15])
    _, mean_free, std_free, _ = sde_step(x, v, sigma, sigma_next, eta=1.0, noise=noise)
    x_next, mean, std, lp = sde_step(x, v, sigma, sigma_next, eta=1.0, noise=noise, std_max=0.45)
    assert float(std_free[0]) > 0.45 > float(std_free[1])               # the case is the one intended
    assert float(std[0]) == pytest.approx(0.45) and float(std[1]) == pytest.approx(float(std_free[1]))
    torch.testing.assert_close(mean, mean_free)                         # the mean keeps the untruncated g
    torch.testing.assert_close(x_next, mean + std * noise)
    ref_lp = torch.distributions.Normal(mean, std).log_prob(x_next).mean(1)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)


def test_sde_log_prob_gradient_matches_closed_form():
    """d log_prob / d v = mean_b((x_next - mean) / std^2) * d mean / d v, d mean / d v = -(1 + g^2 (1-s) / (2 s)) dt."""
    torch.manual_seed(3)
    x, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    v = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.8, 0.5], dtype=torch.float64)
    sigma_next, eta = torch.tensor([0.7, 0.3], dtype=torch.float64), 0.8
    x_next, mean, std, lp = sde_step(x, v, sigma, sigma_next, eta=eta, noise=noise)
    lp.sum().backward()
    s, dt = sigma.view(-1, 1, 1), (sigma_next - sigma).view(-1, 1, 1)
    g2 = eta**2 * s / (1 - s)
    dmean_dv = -(1 + g2 * (1 - s) / (2 * s)) * dt
    n = x[0].numel()
    closed = ((x_next - mean) / std**2 / n * dmean_dv).detach()
    torch.testing.assert_close(v.grad, closed, rtol=1e-10, atol=1e-12)
    # The same sample re-evaluated under new parameters goes through sde_log_prob.
    _, mean2, std2, _ = sde_step(x, v.detach() + 0.1, sigma, sigma_next, eta=eta, noise=noise)
    ref = torch.distributions.Normal(mean2, std2).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(sde_log_prob(x_next, mean2, std2), ref)


def test_sde_step_rejects_bad_sigmas():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="sigma < 1"):
        sde_step(x, x, 1.0, 0.9, eta=1.0)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, x, 0.5, 0.6, eta=1.0)


def test_group_advantages_several_rewards_unequal_group_stds():
    """Hand computation in numpy; the groups' stds differ so that dividing by each group's own std (or by the
    mean std, or with the sample std) gives different numbers."""
    rng = np.random.default_rng(0)
    P, G, R = 3, 4, 2
    rewards = rng.normal(size=(P, G, R)) * np.array([0.1, 1.0, 5.0])[:, None, None] + np.array([1.0, -3.0])
    weights = np.array([0.7, 0.3])
    expected = np.zeros((P, G))
    for r in range(R):
        stds = [np.sqrt(np.mean((rewards[p, :, r] - rewards[p, :, r].mean()) ** 2)) for p in range(P)]
        for p in range(P):
            expected[p] += weights[r] * (rewards[p, :, r] - rewards[p, :, r].mean()) / (max(stds) + 1e-8)
    got = group_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(weights))
    assert got.shape == (P, G)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), 0.0, atol=1e-5)       # zero mean per group
    # The group with the largest spread reaches the unit scale per reward; the others stay below it.
    single = group_advantages(torch.tensor(rewards[..., :1], dtype=torch.float32), [1.0])
    stds = single.std(1, correction=0)
    assert float(stds.max()) == pytest.approx(1.0, rel=1e-5) and float(stds.min()) < 0.2


def test_group_advantages_identical_rewards_are_zero():
    assert torch.equal(group_advantages(torch.ones(2, 4, 1), [1.0]), torch.zeros(2, 4))


def _rollout_batch(seed=4):
    torch.manual_seed(seed)
    B = 4
    x, v = torch.randn(B, 2, 3, 3), torch.randn(B, 2, 3, 3)
    sigma, sigma_next = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.85, 0.7, 0.65, 0.4])
    x_next, _, _, old_lp = sde_step(x, v, sigma, sigma_next, eta=1.0, std_max=0.45)
    return x, v, sigma, sigma_next, x_next, old_lp


def test_grpo_loss_on_policy_ratio_is_one_and_loss_is_its_closed_form():
    x, v, sigma, sigma_next, x_next, old_lp = _rollout_batch()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    v_new = v.clone().requires_grad_(True)
    _, mean, std, _ = sde_step(x, v_new, sigma, sigma_next, eta=1.0, std_max=0.45)
    lp = sde_log_prob(x_next, mean, std)
    v_ref = v + 0.05 * torch.randn_like(v)
    _, mean_ref, _, _ = sde_step(x, v_ref, sigma, sigma_next, eta=1.0, std_max=0.45)
    out = grpo_loss(lp, old_lp, adv, sigma, sigma_next, clip_range=1e-3, kl_beta=0.004,
                    mean=mean, mean_ref=mean_ref, std=std)
    assert torch.equal(lp.detach(), old_lp)                              # exactly, not approximately
    assert out.metrics["ratio_mean"] == out.metrics["ratio_min"] == out.metrics["ratio_max"] == 1.0
    assert out.metrics["clip_fraction"] == 0.0
    w = torch.sqrt(sigma / (1 - sigma)) / torch.sqrt(sigma - sigma_next)
    kl = ((mean - mean_ref) ** 2 / (2 * std**2)).flatten(1).mean(1)
    expected = (w * -adv + 0.004 * w**2 * kl).mean()                    # ratio 1: policy term is -A
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["kl"] == pytest.approx(float(kl.detach().mean()), rel=1e-6)
    # Gradient on policy of the first update: d/dv of mean(w * -A * ratio) = mean(-A w d lp/dv) at ratio 1.
    out.loss.backward()
    v2 = v.clone().requires_grad_(True)
    _, m2, s2, _ = sde_step(x, v2, sigma, sigma_next, eta=1.0, std_max=0.45)
    ref_loss = (w * -adv * sde_log_prob(x_next, m2, s2)
                + 0.004 * w**2 * ((m2 - mean_ref) ** 2 / (2 * s2**2)).flatten(1).mean(1)).mean()
    ref_loss.backward()
    torch.testing.assert_close(v_new.grad, v2.grad, rtol=1e-5, atol=1e-8)


def test_grpo_loss_clipping_off_policy():
    """The PPO clip: for A > 0 a ratio above 1 + eps is clipped (no gradient), for A < 0 one below 1 - eps."""
    old = torch.zeros(4)
    lp = torch.tensor([0.1, -0.1, 0.1, -0.1], requires_grad=True)        # ratios e^0.1, e^-0.1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = grpo_loss(lp, old, adv, 0.5, 0.4, clip_range=0.05)
    r = torch.exp(lp.detach())
    w = math.sqrt(0.5 / 0.5) / math.sqrt(0.1)
    per = torch.maximum(-adv * r, -adv * r.clamp(0.95, 1.05))
    torch.testing.assert_close(out.loss, (w * per).mean())
    out.loss.backward()
    # Clipped (flat) for samples 0 (A>0, r>1+eps) and 3 (A<0, r<1-eps); live for 1 and 2.
    assert lp.grad[0] == 0 and lp.grad[3] == 0
    torch.testing.assert_close(lp.grad[1:3], (w * -adv[1:3] * r[1:3]) / 4)
    assert out.metrics["clip_fraction"] == 1.0
    assert out.metrics["ratio_max"] == pytest.approx(math.exp(0.1), rel=1e-6)


def test_timestep_reweighting_removes_step_size_dependence():
    """The reason for w: the policy gradient of one step scales like sqrt(|dt|) * sqrt((1-s)/s); times w it
    does not depend on sigma or dt. Checked on |d lp / d v| for noise fixed to ones (no randomness)."""
    x, v = torch.zeros(1, 64), torch.zeros(1, 64)
    norms = []
    for sigma, sigma_next in [(0.9, 0.85), (0.9, 0.5), (0.4, 0.39), (0.2, 0.05)]:
        vv = v.clone().requires_grad_(True)
        x_next, mean, std, lp = sde_step(x, vv, sigma, sigma_next, eta=0.5, noise=torch.ones(1, 64))
        lp.sum().backward()
        w = float(timestep_weight(sigma, sigma_next))
        assert w == pytest.approx(math.sqrt(sigma / (1 - sigma)) / math.sqrt(sigma - sigma_next), rel=1e-6)
        # What is left, (1 + g^2 (1-s)/(2s)) = 1 + eta^2/2, is constant: w * |grad| = (1 + eta^2/2) / eta / n.
        norms.append(w * float(vv.grad.abs().mean()))
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)
    assert norms[0] == pytest.approx((1 + 0.25 / 2) / 0.5 / 64, rel=1e-5)


def test_grpo_metrics_of_parts_are_those_of_the_whole_batch():
    """Rows of ``stats`` from parts of a batch (ranks, chunks of 5 and 3 samples) combine into the figures of
    the whole batch: means weighted by the sample count, the advantage std of all samples, min/max of all.
    Catches a mean of per-part means (parts of unequal size) or a mean of per-part stds."""
    from lcv_train.rl import grpo_metrics

    g = torch.Generator().manual_seed(0)
    B = 8
    old = torch.randn(B, generator=g)
    new = old + 0.3 * torch.randn(B, generator=g)
    adv = torch.randn(B, generator=g) * torch.linspace(0.5, 3.0, B)
    mean, mean_ref = torch.randn(B, 6, generator=g), torch.randn(B, 6, generator=g)
    sigma, sigma_next = torch.linspace(0.3, 0.8, B), torch.linspace(0.2, 0.7, B)

    def part(lo, hi):
        return grpo_loss(new[lo:hi], old[lo:hi], adv[lo:hi], sigma[lo:hi], sigma_next[lo:hi], clip_range=0.2,
                         kl_beta=0.1, mean=mean[lo:hi], mean_ref=mean_ref[lo:hi], std=torch.full((hi - lo, 1), 0.5))

    whole = part(0, B).metrics
    combined = grpo_metrics(torch.stack([part(0, 5).stats, part(5, B).stats]))
    assert set(combined) == set(whole)
    for k, v in whole.items():
        assert combined[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert whole["advantage_std"] == pytest.approx(float(adv.double().std(correction=0)), rel=1e-6)
    assert 0 < whole["clip_fraction"] < 1
