"""Group rollouts (lcv_train.rl.rollout) with a closed-form velocity: Gaussian data, whose exact
published-sign velocity E[x0 - eps | x_sigma] is known."""

import pytest
import torch

from lcv_train.rl import prompt_generator, prompt_line, rollout, sde_step
from lcv_train.sampling.sampler import sigma_schedule

MU, S0 = 0.7, 0.5      # data x0 ~ N(MU, S0^2) per element


def gaussian_velocity(x, sigma):
    """E[x0 - eps | x] for x = (1 - s) x0 + s eps, x0 ~ N(MU, S0^2), eps ~ N(0, 1)."""
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * S0**2 + s**2
    r = x - (1 - s) * MU
    return (MU + (1 - s) * S0**2 / var * r) - s / var * r


def test_group_shares_the_path_until_the_critical_step_and_log_prob_recomputes():
    sigmas = sigma_schedule(8, 3.0)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    out = rollout(gaussian_velocity, noise, sigmas, group_size=4, sde_window=(1, 4), eta=1.0, std_max=0.45,
                  generator=torch.Generator().manual_seed(1))
    assert out.final.shape == (12, 2, 4, 4) and out.log_prob.shape == (12,)
    assert out.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for p in range(3):
        rows = slice(4 * p, 4 * p + 4)
        steps = out.step[rows]
        assert (steps == steps[0]).all() and 1 <= int(steps[0]) < 4             # one step per prompt, in the window
        x = out.x[rows]
        assert torch.equal(x, x[:1].expand_as(x))                             # same path before the step
        # ... which is the ODE path from the prompt's noise:
        xo = noise[p:p + 1].clone()
        for i in range(int(steps[0])):
            xo = xo - (sigmas[i + 1] - sigmas[i]) * gaussian_velocity(xo, sigmas[i].view(1))
        torch.testing.assert_close(x[:1], xo, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.mean[rows], out.mean[4 * p:4 * p + 1].expand_as(out.mean[rows]))
        assert len({tuple(r.flatten().tolist()[:3]) for r in out.x_next[rows]}) == 4   # differ after it
        assert len({tuple(r.flatten().tolist()[:3]) for r in out.final[rows]}) == 4
    # log_prob of the stored sample, recomputed from the stored x with the velocity function.
    v = gaussian_velocity(out.x, out.sigma)
    lp, mean, std = out.log_prob_under(v, eta=1.0, std_max=0.45)
    assert torch.equal(lp, out.log_prob)
    ref = torch.distributions.Normal(mean, std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    # Seeded: the same generator seed gives the same rollout.
    again = rollout(gaussian_velocity, noise, sigmas, 4, (1, 4), 1.0, 0.45, torch.Generator().manual_seed(1))
    assert torch.equal(again.final, out.final) and torch.equal(again.step, out.step)


@pytest.mark.parametrize("sigma", [0.8, 0.5, 0.3])
def test_sde_step_keeps_the_data_distribution(sigma):
    """One SDE step with the exact velocity takes exact samples of p_sigma to p_sigma_next (the g^2 score
    correction cancels the injected noise): variance within 1.5 % (200k elements; the step's own error is
    ~1 %); the diffusers-sign formula fed the published v (a sign slip) is off by > 5 %."""
    g = torch.Generator().manual_seed(0)
    sigma_next = sigma - 0.02
    var = lambda s: (1 - s) ** 2 * S0**2 + s**2  # noqa: E731
    x = (1 - sigma) * MU + var(sigma) ** 0.5 * torch.randn(400, 512, generator=g)
    v = gaussian_velocity(x, torch.full((400,), sigma))
    x_next, *_ = sde_step(x, v, sigma, sigma_next, eta=1.0, generator=g)
    assert float(x_next.var()) / var(sigma_next) == pytest.approx(1.0, abs=0.015)
    assert float(x_next.mean()) == pytest.approx((1 - sigma_next) * MU, abs=0.01)
    wrong, *_ = sde_step(x, -v, sigma, sigma_next, eta=1.0, generator=g)
    assert abs(float(wrong.var()) / var(sigma_next) - 1) > 0.05


def test_truncated_std_and_window_checks():
    sigmas = sigma_schedule(8, 3.0)
    noise = torch.randn(2, 16)
    out = rollout(gaussian_velocity, noise, sigmas, 2, (1, 2), eta=1.0, std_max=0.05)
    assert torch.allclose(out.std.flatten(), torch.full((4,), 0.05))
    with pytest.raises(ValueError, match="sigma = 1"):
        rollout(gaussian_velocity, noise, sigmas, 2, (0, 3))
    with pytest.raises(ValueError, match="sde_window"):
        rollout(gaussian_velocity, noise, sigmas, 2, (3, 12))


def test_a_prompts_rollout_depends_on_its_own_generator_only():
    """With a generator per prompt (``prompt_generator(seed, batch, global prompt index)``), prompt k's critical
    step, SDE noise and samples are the same in a batch of 3 prompts and alone: what makes a data-parallel
    rank's rollouts those of one process holding every prompt. Catches draws shared across prompts (one
    generator for the batch), whose stream shifts with the prompts before k."""
    sigmas = sigma_schedule(8, 3.0)
    noise = torch.stack([torch.randn(2, 4, 4, generator=prompt_generator(5, 2, k)) for k in range(3)])
    gens = [prompt_generator(5, 2, k) for k in range(3)]
    for g in gens:  # the initial noise came first from each generator, as the stage draws it
        torch.randn(2, 4, 4, generator=g)
    every = rollout(gaussian_velocity, noise, sigmas, 4, (1, 6), 1.0, 0.45, generator=gens)
    g2 = prompt_generator(5, 2, 2)
    alone = rollout(gaussian_velocity, torch.randn(1, 2, 4, 4, generator=g2), sigmas, 4, (1, 6), 1.0, 0.45,
                    generator=[g2])
    for name in ("final", "x_next", "log_prob", "step"):
        assert torch.equal(getattr(alone, name), getattr(every, name)[8:12]), name
    other = rollout(gaussian_velocity, noise[2:], sigmas, 4, (1, 6), 1.0, 0.45, generator=[prompt_generator(5, 3, 2)])
    assert not torch.equal(other.final, alone.final)  # another rollout batch draws other noise


def test_prompt_lines_come_in_passes_each_line_once_in_a_fresh_order():
    """``prompt_line(seed, n, position)``: positions ``p*n .. p*n + n - 1`` (pass p) take every line exactly once,
    two passes and two seeds differ in order, and the line is a function of (seed, n, position) alone, so
    splitting the job's prompts over ranks changes nothing. Catches a draw with replacement (a pass would repeat
    a line and skip another: unequal shares of the updates) and one order for every pass."""
    n = 7
    passes = [[prompt_line(11, n, p * n + i) for i in range(n)] for p in range(4)]
    for lines in passes:
        assert sorted(lines) == list(range(n))
    assert len({tuple(lines) for lines in passes}) > 1
    assert [prompt_line(12, n, i) for i in range(n)] != passes[0]  # 7! orders: equal by chance 1 in 5040
    assert [prompt_line(11, n, 9 + i) for i in range(3)] == [passes[1][2], passes[1][3], passes[1][4]]
    assert prompt_line(3, 1, 5) == 0
