"""The sigma schedules against the closed forms of SPEC section 9, written out independently here."""

import math

import pytest
import torch

from lcv_train.sampling import base_sigmas, distill_sigmas, enhance_hf_sigmas, refine_sigmas, sigma_schedule


def _shift(x: float, s: float) -> float:
    return s * x / (1 + (s - 1) * x)


def _base(steps: int, s: float) -> list[float]:
    return [_shift(1 - i * (1 - 0.001) / (steps - 1), s) for i in range(steps)] + [0.0]


@pytest.mark.parametrize("steps,shift", [(50, 12.0), (7, 3.0), (2, 1.0)])
def test_base_schedule(steps, shift):
    assert base_sigmas(steps, shift).tolist() == pytest.approx(_base(steps, shift), abs=1e-7)
    assert base_sigmas(steps, shift).dtype == torch.float32


def test_enhance_hf_schedule_keeps_sigmas_above_half_then_a_uniform_tail():
    """50 steps at shift 12: 46 base sigmas are above 0.5, then 0.5, 0.45, ..., 0.05, then 0 (56 steps)."""
    base = _base(50, 12.0)[:-1]
    head = [s for s in base if s > 0.5]
    assert len(head) == 46
    want = head + [(500 - 50 * k) / 1000 for k in range(10)] + [0.0]
    got = enhance_hf_sigmas(50, 12.0)
    assert len(got) - 1 == 56
    assert got.tolist() == pytest.approx(want, abs=1e-7)


def test_distill_schedule_indices():
    """The published 16 indices into 1000, 980, ..., 20 (catches an off-by-one grid or rounding, not floor)."""
    idx = [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 46]
    assert [math.floor(i * 50 / 16) for i in range(16)] == idx
    grid = [1000 - 20 * i for i in range(50)]
    assert distill_sigmas(16).tolist() == pytest.approx([grid[i] / 1000 for i in idx] + [0.0], abs=1e-7)
    assert sigma_schedule(16, 12.0, kind="distill").tolist() == distill_sigmas(16).tolist()  # no shift


def test_refine_schedule_starts_at_half():
    base = _base(50, 12.0)[:-1]
    want = [0.5] + [s for s in base if s < 0.5] + [0.0]
    got = refine_sigmas(50, 12.0)
    assert got.tolist() == pytest.approx(want, abs=1e-7)
    assert len(got) - 1 == 5  # "about 5 steps from t = 0.5"


def test_bad_schedule_names_and_steps():
    with pytest.raises(ValueError, match="schedule='cosine'"):
        sigma_schedule(4, 1.0, kind="cosine")
    with pytest.raises(ValueError, match="steps"):
        base_sigmas(0, 1.0)
