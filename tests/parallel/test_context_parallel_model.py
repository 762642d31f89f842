"""The tiny DiT with ``apply_context_parallel`` on 2 gloo ranks equals the single-process model.

Same weights on every rank; the output (gathered on every rank) must equal the single-process output, and
the cp-group mean of each parameter gradient must equal the single-process gradient (``comm.py``'s
convention). T2V and VC (two condition frames) forwards share one backward; inference with the condition
K/V cache is compared too; on an even grid and on one that the ranks can only share with padding. fp32, rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

try:
    from _dist import close_pools, get_pool
except ImportError:  # tests/parallel became a package
    from tests.parallel._dist import close_pools, get_pool

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _pools():
    yield
    close_pools()


def _build(attention: str):
    from lcv_train.model import BSAConfig, LongCatDiT

    overrides = {}
    if attention == "bsa":
        overrides = dict(attention="bsa", bsa=BSAConfig(sparsity=0.5, chunk_3d_shape_q=(2, 2, 2),
                                                        chunk_3d_shape_k=(2, 2, 2), backend="torch"))
    model = LongCatDiT.from_preset("tiny", **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere (AdaLN-Zero would zero the attention gradients)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _loss(model, hw):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 5, *hw, generator=g)
    text = torch.randn(1, 6, 32, generator=g)
    mask = torch.tensor([[True, True, True, True, False, False]])
    w = torch.randn(1, 16, 5, *hw, generator=g)
    outs = [model(latents, torch.tensor([700.0]), text, mask, num_cond_latents=nc) for nc in (0, 2)]
    loss = sum((o * w).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs]


def _check_model(rank, world, attention, mode, hw):
    from parallel.context_parallel import apply_context_parallel

    ref = _build(attention)
    cp_model = copy.deepcopy(ref)
    apply_context_parallel(cp_model, dist.group.WORLD, mode)
    assert cp_model.attention_op.cp_mode == mode and cp_model.attention_op.name == attention
    ref_outs, cp_outs = _loss(ref, hw), _loss(cp_model, hw)
    for a, b in zip(cp_outs, ref_outs):
        torch.testing.assert_close(a, b, **TOL)
    for (name, p), q in zip(cp_model.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g / world, q.grad, **TOL, msg=lambda m: f"{attention}/{mode} grad {name}: {m}")
    # inference with the condition K/V cache (sharded like the tokens)
    g = torch.Generator().manual_seed(3)
    cond, noisy = torch.randn(1, 16, 2, *hw, generator=g), torch.randn(1, 16, 3, *hw, generator=g)
    text = torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        outs = [m(noisy, torch.tensor([300.0]), text, None, cond_cache=m.encode_condition(cond))
                for m in (ref, cp_model)]
    torch.testing.assert_close(outs[1], outs[0], **TOL)


@pytest.mark.parametrize("attention,mode,hw", [
    ("dense", "ring", (8, 8)), ("dense", "ulysses", (8, 8)), ("bsa", "ring", (8, 8)), ("bsa", "ulysses", (8, 8)),
    # a 5 x 3 token grid: padded tiles (BSA ring: 1 x 2 tiles of 6 x 2, whole 2 x 2 blocks)
    ("dense", "ring", (10, 6)), ("bsa", "ring", (10, 6)), ("bsa", "ulysses", (10, 6))])
def test_tiny_dit_context_parallel_matches_single_process(attention, mode, hw):
    get_pool(2).run(_check_model, attention, mode, hw)


def _check_fsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallel.context_parallel import apply_context_parallel

    ref = _build("dense")
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    apply_context_parallel(model, mesh, "ring")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(2)
    latents, target = torch.randn(1, 16, 3, 8, 4, generator=g), torch.randn(1, 16, 3, 8, 4, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    for m in (ref, model):
        out = m(latents, torch.tensor([500.0]), text, None, num_cond_latents=1)
        torch.nn.functional.mse_loss(out, target).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, **TOL, msg=lambda m: f"grad {name}: {m}")


def test_fsdp2_mean_over_cp_ranks_gives_single_process_gradients():
    """The gradient convention in practice: FSDP2 sharded over the cp ranks (its default mean reduction)
    turns the per-rank gradients into exactly the single-process ones."""
    get_pool(2).run(_check_fsdp)
