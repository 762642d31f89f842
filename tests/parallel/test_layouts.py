"""Real parallel layouts on 2 CPU processes (gloo) train like one process on the same data.

Each data-parallel rank gets its half of the global batch; the single-process reference uses the whole
batch. Everything is fp32, so the only differences are summation order: losses and grad norms must agree
to 1e-5 relative, parameters after 3 AdamW steps (lr 1e-2, clipping active) to 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch

import _layouts as L
from _spawn import run_ranks

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def _fsdp_worker(rank, world, layout):
    from parallel import ParallelConfig, build_engine, init_distributed, parallelize_model

    cfg = ParallelConfig(**layout)
    dims = init_distributed(cfg)
    model = parallelize_model(L.make_model(), dims, cfg)
    engine = build_engine(model, L.make_optimizer(model), dims, cfg, grad_clip=L.GRAD_CLIP)
    n = L.GLOBAL_BATCH // dims.dp_size
    losses, norms = L.train(engine, L.make_batches(), dims.dp_rank * n, (dims.dp_rank + 1) * n)
    return losses, norms, engine.full_model_state_dict(), dims.dp_rank


@pytest.fixture(scope="module")
def ref():
    return L.reference()


def _check(results, ref):
    ref_losses, ref_norms, ref_sd = ref
    # each dp rank's loss is the mean over its rows; the reference is the mean over all rows
    per_dp = {r[3]: r[0] for r in results}
    mean_loss = torch.tensor([per_dp[d] for d in sorted(per_dp)]).mean(0)
    torch.testing.assert_close(mean_loss, torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    for r in results:
        torch.testing.assert_close(torch.tensor(r[1]), torch.tensor(ref_norms), rtol=LOSS_RTOL, atol=0)
    for r in results[:1]:  # the full state dict is gathered on rank 0 only
        sd = r[2]
        assert set(sd) == set(ref_sd)
        for k, v in ref_sd.items():
            torch.testing.assert_close(sd[k].float(), v, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"{k}: {m}")


def test_fsdp2_two_ranks_matches_single(ref):
    results = run_ranks(_fsdp_worker, 2, dict(name="fsdp", engine="fsdp"))
    _check(results, ref)


def test_hsdp_two_ranks_matches_single(ref):
    results = run_ranks(_fsdp_worker, 2, dict(name="hsdp", engine="fsdp", dp_replicate=2))
    _check(results, ref)


def test_fsdp2_with_checkpointing_matches_single(ref):
    results = run_ranks(_fsdp_worker, 2, dict(name="fsdp", engine="fsdp", activation_checkpointing=1))
    _check(results, ref)
