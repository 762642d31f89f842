"""The validation curve (lcv_train/eval/validation.py): fixed noise per sample, the same on any world size.

Catches: noise drawn from a shared stream (results then depend on batch composition and world size), a
mean taken per rank and then averaged (wrong with uneven splits), ranks of one replica counted twice, a
rank that runs fewer forward passes than the others (a hang under FSDP).
"""

from __future__ import annotations

import torch

from lcv_train.eval.validation import ValSample, sample_noise, validation_loss
from lcv_train.model import LongCatDiT
from tests.parallel._spawn import run_ranks

SIGMAS = [0.1, 0.5, 0.9]
N = 7  # odd: 2 ranks get 4 and 3 samples


def _model() -> LongCatDiT:
    """The tiny DiT with every weight perturbed: at init its output is zero (AdaLN-Zero), loss flat in sigma."""
    torch.manual_seed(0)
    model = LongCatDiT.from_preset("tiny").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _samples() -> list[ValSample]:
    g = torch.Generator().manual_seed(5)
    return [ValSample(i, torch.randn(16, 2, 4, 4, generator=g), torch.randn(6, 32, generator=g),
                      torch.arange(6) < 3 + i % 3) for i in range(N)]


def _reference() -> dict[float, float]:
    """Sample by sample, no batching, no ranks: the closed form of the loss."""
    model = _model()
    out = {}
    for sigma in SIGMAS:
        losses = []
        for s in _samples():
            eps = sample_noise(s.latents.shape, 11, s.index)
            x = sigma * eps + (1 - sigma) * s.latents
            with torch.no_grad():
                v = model(x[None], torch.tensor([sigma * 1000.0]), s.text[None], s.text_mask[None])
            losses.append(float(((v[0] - (s.latents - eps)) ** 2).mean()))
        out[sigma] = sum(losses) / len(losses)
    return out


def _on_rank(rank: int, world: int) -> dict[float, float]:
    torch.manual_seed(100 + rank)  # the global RNG differs per rank: the result must not depend on it
    mine = [s for s in _samples() if s.index % world == rank]
    return validation_loss(_model(), mine, N, SIGMAS, seed=11, dp_rank=rank, dp_size=world, batch_size=2)


def test_matches_the_per_sample_reference_and_is_deterministic():
    ref = _reference()
    torch.manual_seed(1)
    a = validation_loss(_model(), _samples(), N, SIGMAS, seed=11, batch_size=3)
    torch.manual_seed(2)
    b = validation_loss(_model(), _samples(), N, SIGMAS, seed=11, batch_size=8)
    assert a == b or all(abs(a[s] - b[s]) <= 1e-6 * a[s] for s in SIGMAS)  # batching may move the last bit
    for s in SIGMAS:
        assert abs(a[s] - ref[s]) <= 1e-5 * ref[s], (s, a[s], ref[s])
    assert a[0.1] != a[0.9]  # the curve has a shape: sigma reaches the model
    c = validation_loss(_model(), _samples(), N, SIGMAS, seed=12, batch_size=3)
    assert all(c[s] != a[s] for s in SIGMAS)  # and the seed reaches the noise


def test_one_rank_equals_two_ranks():
    one = run_ranks(_on_rank, 1)[0]
    two = run_ranks(_on_rank, 2)
    assert two[0] == two[1]  # every rank gets the same figures
    for s in SIGMAS:
        assert abs(two[0][s] - one[s]) <= 1e-6 * one[s], (s, two[0][s], one[s])
