"""The training mechanics against independent statements of what they must do: the EMA's closed form,
the lr schedule's values at chosen steps, gradient clipping through the real engine, and gradient
accumulation through the real trainer. Each test's docstring names the planted bug it catches
(``python bench/mutations.py`` plants them)."""

from __future__ import annotations

import math

import pytest
import torch

from lcv_train.training.ema import EMA
from lcv_train.training.schedule import build_lr_scheduler
from parallel import TorchEngine


class _Vector(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


# -- EMA ----------------------------------------------------------------------------------------------
def test_ema_after_k_updates_is_the_closed_form_with_decay_0_9():
    """After k updates with decay d = 0.9 from weights w_0, w_1, ..., w_k (w_i the weights at update i),
    the average is d^k w_0 + sum_i (1 - d) d^(k - i) w_i. Catches: the lerp weight swapped (decay in place
    of 1 - decay), any decay of the shadow itself (weight decay applied to it)."""
    torch.manual_seed(0)
    model = _Vector(torch.randn(6).tolist())
    ema = EMA(model, 0.9)
    history = [model.w.detach().double().clone()]
    for _ in range(5):
        with torch.no_grad():
            model.w.add_(torch.randn(6))
        history.append(model.w.detach().double().clone())
        ema.update()
    k, d = 5, 0.9
    expected = d ** k * history[0] + sum((1 - d) * d ** (k - i) * history[i] for i in range(1, k + 1))
    torch.testing.assert_close(ema.state_dict()["w"].double(), expected, rtol=1e-6, atol=1e-6)


def test_weight_decay_moves_the_weights_but_never_the_ema_shadow():
    """AdamW with a large weight decay on the real engine, the EMA updated after every step: the shadow is
    the closed form of the weights the optimizer produced (it follows them, it is not decayed itself), and
    a model whose gradients are zero still moves under weight decay while its EMA only follows.
    Catches: weight decay (or any shrinking) applied to the EMA shadow."""
    torch.manual_seed(1)
    model = _Vector([1.0, -2.0, 0.5, 3.0])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    engine = TorchEngine(model, opt, grad_clip=0.0)
    ema = EMA(model, 0.9)
    history = [model.w.detach().double().clone()]
    for _ in range(4):
        model.w.grad = torch.zeros(4)  # only the decoupled weight decay moves the weights
        engine.step()
        history.append(model.w.detach().double().clone())
        ema.update()
    # AdamW's decoupled decay: w <- w * (1 - lr * wd) per step (zero gradient: no Adam update)
    torch.testing.assert_close(history[-1], history[0] * (1 - 0.1 * 0.5) ** 4, rtol=1e-6, atol=0)
    d = 0.9
    expected = d ** 4 * history[0] + sum((1 - d) * d ** (4 - i) * history[i] for i in range(1, 5))
    torch.testing.assert_close(ema.state_dict()["w"].double(), expected, rtol=1e-6, atol=1e-7)


# -- learning-rate schedule ----------------------------------------------------------------------------
def _lrs_used(kind: str, steps: int, warmup: int = 4, total: int = 12, min_ratio: float = 0.1) -> list[float]:
    """The lr each optimizer step uses (read from the optimizer), for peak lr 1."""
    from lcv_train.config import ScheduleConfig

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=min_ratio), total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_values_at_chosen_steps():
    """Warmup of 4 steps ramps (k + 1) / 4 (so the first step already trains), then cosine from 1 to 0.1
    over the remaining 8 of 12 steps: at step 6, 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.86820; at 8, 0.55;
    from 12 on, 0.1. Catches: a warmup of k / warmup (first step lr 0), a ramp one step late, cosine
    progress counted from step 0 instead of the warmup's end, the minimum ratio ignored."""
    lrs = _lrs_used("cosine", 15)
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 8: 0.55,
                12: 0.1, 14: 0.1}
    for k, v in expected.items():
        assert lrs[k] == pytest.approx(v, abs=1e-9), (k, lrs)


def test_linear_and_constant_schedules():
    """Linear decay reaches 1 - 0.9 * 2/8 = 0.775 at step 6 and 0.1 at 12; constant stays 1 after warmup."""
    lin = _lrs_used("linear", 13)
    assert lin[6] == pytest.approx(0.775, abs=1e-9) and lin[12] == pytest.approx(0.1, abs=1e-9)
    const = _lrs_used("constant", 13)
    assert const[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and const[4:] == pytest.approx([1.0] * 9)
    assert _lrs_used("cosine", 3, warmup=0, total=2) == pytest.approx([1.0, 0.55, 0.1])


# -- gradient clipping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grad,expected_step", [
    ([1.2, 1.6], [0.6, 0.8]),  # norm 2 at clip 1: halved
    ([0.3, 0.4], [0.3, 0.4]),  # norm 0.5: left alone
])
def test_clipping_halves_norm_2_and_leaves_norm_0_5(grad, expected_step):
    """The real ``TorchEngine`` with clip 1 and SGD(lr=1): the step taken is the clipped gradient, and
    ``step()`` reports the norm before clipping. Catches: the clipping condition inverted, clipping to the
    wrong norm, the reported norm taken after clipping."""
    model = _Vector([0.0, 0.0])
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=1.0)
    model.w.grad = torch.tensor(grad)
    norm = engine.step()
    assert norm == pytest.approx(math.hypot(*grad), rel=1e-6)
    torch.testing.assert_close(-model.w.detach(), torch.tensor(expected_step), rtol=1e-5, atol=0)
    assert model.w.grad is None  # gradients are cleared for the next step


def test_clip_zero_disables_clipping():
    model = _Vector([0.0, 0.0])
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0.0)
    model.w.grad = torch.tensor([3.0, 4.0])
    assert engine.step() == pytest.approx(5.0)
    torch.testing.assert_close(-model.w.detach(), torch.tensor([3.0, 4.0]))


# -- the real trainer: gradient accumulation, EMA after the step, warmup lr --------------------------
def _fixed_noise_loss(model, sb, generator):
    """The flow-matching loss with noise that is a function of each sample alone (so a sample gets the
    same noise whichever micro-batch it lands in): the trainer's mechanics are what differs."""
    from lcv_train.diffusion import add_noise, flow_matching_loss, velocity_target

    x0 = sb.latents
    eps = torch.sin(3.0 * x0.flip(-1)) + 0.1
    sigma = torch.sigmoid(x0.mean(dim=(1, 2, 3, 4)))
    v = model(add_noise(x0, eps, sigma), 1000 * sigma, sb.text, sb.text_mask, num_cond_latents=0)
    return flow_matching_loss(v, velocity_target(x0, eps), 0), {}


def _batches(n_samples: int, per_batch: int):
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(n_samples, 16, 2, 4, 4, generator=g)
    text = torch.randn(n_samples, 3, 32, generator=g)
    mask = torch.ones(n_samples, 3, dtype=torch.bool)
    mask[1::2, 2] = False
    return [{"latents": lat[i:i + per_batch], "text": text[i:i + per_batch], "text_mask": mask[i:i + per_batch],
             "num_cond_latents": 0} for i in range(0, n_samples, per_batch)]


def _trainer(tmp_path, name: str, grad_accum: int, batch: int):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import conf
    from lcv_train.config import train_config_from_dict
    from lcv_train.training.trainer import Trainer

    overrides = [f"run.root={tmp_path / 'runs'}", f"run.name={name}", "logger=none", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}",
                 "synthetic.n=4", "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16",
                 "data.buckets=[[5,16,16]]", f"data.batch_size={batch}", "data.num_workers=0",
                 f"trainer.grad_accum={grad_accum}", "trainer.max_steps=10", "schedule.kind=cosine",
                 "schedule.warmup_steps=2", "optim.lr=1e-2", "optim.grad_clip=100", "ema.decay=0.9",
                 "trainer.resume=none", "trainer.device=cpu"]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=overrides)
    trainer = Trainer(train_config_from_dict(OmegaConf.to_container(cfg, resolve=True)))
    trainer.stage.loss = _fixed_noise_loss  # the stage's own step (accumulation, optimizer_step) is kept
    return trainer


def _weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_grad_accum_2_of_batch_2_equals_one_batch_of_4_through_the_trainer(tmp_path):
    """``Trainer.train_step`` on the same 4 samples, as 1 micro-batch of 4 or 2 micro-batches of 2: the
    same loss, the same gradient norm and the same weights after the step (fp32: rounding only). Also:
    the first step uses the warmup's lr (peak / 2 with 2 warmup steps) and the EMA (decay 0.9) is
    updated after the optimizer step (0.9 w_0 + 0.1 w_1). Catches: the loss not divided by
    ``grad_accum`` (gradient norm doubled), the EMA updated before the step or skipped."""
    one = _trainer(tmp_path, "accum1", grad_accum=1, batch=4)
    two = _trainer(tmp_path, "accum2", grad_accum=2, batch=2)
    w0 = _weights(one)
    for n, w in _weights(two).items():  # the same seed: the same initial weights
        torch.testing.assert_close(w, w0[n], rtol=0, atol=0)
    assert one.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-2)
    m1 = one.train_step(iter(_batches(4, 4)))
    m2 = two.train_step(iter(_batches(4, 2)))
    assert m1["train/grad_norm"] > 0.1
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-5)
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5)
    assert m1["train/lr"] == pytest.approx(1e-2)  # the next step's lr: warmup done
    w1, w2 = _weights(one), _weights(two)
    moved = max(float((w1[n] - w0[n]).abs().max()) for n in w0)
    assert moved > 1e-3  # the step did something (Adam's first step moves by ~lr / 2)
    for n in w0:
        torch.testing.assert_close(w2[n], w1[n], rtol=0, atol=1e-3 * moved, msg=n)
        torch.testing.assert_close(one.ema.state_dict()[n], 0.9 * w0[n] + 0.1 * w1[n], rtol=1e-6, atol=1e-7, msg=n)
