"""Non-finite steps: the update is skipped (weights and optimizer untouched), too many in a row stop the
run with one line naming the step, a non-finite model is never checkpointed, lr=inf is refused."""

import math

import pytest
import torch

from lcv_train.config import OptimConfig
from lcv_train.errors import ConfigError, TrainingDiverged
from lcv_train.training.nonfinite import NonFiniteGuard
from parallel.engine import TorchEngine


def _setup(limit):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=0.1), grad_clip=1.0)
    return model, engine, NonFiniteGuard(limit, engine.can_skip_nonfinite)


def _step(model, engine, guard, step, poison=False):
    x = torch.randn(8, 4)
    if poison:
        x[0, 0] = float("nan")
    loss = model(x).pow(2).mean()
    engine.backward(loss)
    value = float(loss)
    finite = math.isfinite(value)  # the trainer learns it from the step's all-reduce (one rank here)
    norm = engine.step() if finite else float("nan")
    if not finite:
        engine.skip_step()
    return guard.after_step(step, value, norm, finite)


def _snapshot(model, engine):
    opt = {k: v.clone() for st in engine.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)}
    return [p.detach().clone() for p in model.parameters()], opt


def test_a_nan_step_is_skipped_and_leaves_weights_and_optimizer_untouched():
    model, engine, guard = _setup(limit=2)
    assert _step(model, engine, guard, 1) is False
    before, opt_before = _snapshot(model, engine)
    assert _step(model, engine, guard, 2, poison=True) is True
    after, opt_after = _snapshot(model, engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt_before.keys() == opt_after.keys() and all(torch.equal(opt_before[k], opt_after[k]) for k in opt_before)
    assert all(p.grad is None for p in model.parameters()), "the bad gradients must be dropped"
    assert _step(model, engine, guard, 3) is False  # a finite step updates again and resets the count
    assert not torch.equal(before[0], model.weight)
    assert guard.in_a_row == 0 and guard.skipped == 1


def test_nan_gradient_norm_alone_skips_the_update():
    """A finite loss with a non-finite gradient (e.g. an overflow in backward) is caught by the norm."""
    model, engine, guard = _setup(limit=1)
    loss = model(torch.randn(2, 4)).sum()
    engine.backward(loss)
    model.bias.grad[0] = float("inf")
    before, _ = _snapshot(model, engine)
    norm = engine.step()
    assert not math.isfinite(norm) and all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, engine)[0]))
    assert guard.after_step(1, float(loss), norm, True) is True


def test_too_many_in_a_row_stop_with_one_line_naming_the_step():
    model, engine, guard = _setup(limit=2)
    _step(model, engine, guard, 1)
    _step(model, engine, guard, 2, poison=True)
    _step(model, engine, guard, 3, poison=True)
    with pytest.raises(TrainingDiverged, match=r"^step 4: loss nan, gradient norm nan is not finite \(3 non-finite "
                                               r"steps in a row, more than trainer.skip_nonfinite_steps=2\)") as e:
        _step(model, engine, guard, 4, poison=True)
    assert "\n" not in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_engine_that_cannot_skip_stops_at_the_first():
    guard = NonFiniteGuard(5, can_skip=False)
    with pytest.raises(TrainingDiverged, match="step 7: .*cannot skip"):
        guard.after_step(7, float("nan"), float("nan"), False)


def test_non_finite_weights_are_never_checkpointed():
    model, _, guard = _setup(limit=3)
    guard.check_weights(model, 5)
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(TrainingDiverged, match="step 5: the model's weights are not finite; not writing a checkpoint"):
        guard.check_weights(model, 5)


@pytest.mark.parametrize("key", ["lr", "weight_decay", "eps", "grad_clip"])
def test_infinite_optimizer_settings_are_refused(key):
    """Bug caught: optim.lr=inf passed validation."""
    with pytest.raises(ConfigError, match=f"optim.{key}: must be a finite number"):
        OptimConfig(**{key: float("inf")}).validate()
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        OptimConfig(**{key: float("nan")}).validate()
