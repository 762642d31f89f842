"""Context parallelism on 2 and 4 gloo ranks equals single-process attention (outputs and dq/dk/dv).

Every rank builds the same full q/k/v (same seed), computes the single-process reference on them, runs the
context-parallel operator on its tile (H x W, zero-padded where the grid does not divide), and compares its
tile of the output (real tokens) and of the gradients (padding included: zero). The
model's two calls with condition frames are reproduced: condition queries over condition keys, noisy
queries over all keys. Tolerances: fp32 rtol 1e-5, atol 1e-5 on values of order 1; bf16 inputs (against the
fp32 reference on the same bf16-rounded inputs) 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

try:
    from _dist import close_pools, get_pool
except ImportError:  # tests/parallel became a package
    from tests.parallel._dist import close_pools, get_pool
from lcv_train.errors import ConfigError
from kernels.attention_op import AttentionOp, BlockSparseAttentionOp
from parallel.context_parallel import (RingAttentionOp, UlyssesAttentionOp, gather_grid, make_context_parallel_op,
                                       resolve_cp_group, split_grid)
from parallel.context_parallel.layout import choose_layout

TOL = dict(rtol=1e-5, atol=1e-5)
B, HEADS, D = 2, 4, 8
DENSE_GRID = (3, 4, 3)
BSA_GRID, BSA_BLOCK = (5, 8, 6), (2, 2, 2)


def _tile(x: torch.Tensor, grid, layout, r: int) -> torch.Tensor:
    """``[B, T*H*W, ...]`` full raster -> rank r's tile of every frame of the zero-padded grid, in the
    tile's raster order. Written from the layout's arithmetic (offset = tile index * tile size)."""
    T, H, W = grid
    (ch, cw), (th, tw) = layout.split, layout.tile
    i, j = r // cw, r % cw
    xg = x.reshape(x.shape[0], T, H, W, *x.shape[2:])
    padded = xg.new_zeros((x.shape[0], T, ch * th, cw * tw) + tuple(x.shape[2:]))
    padded[:, :, :H, :W] = xg
    return padded[:, :, i * th:(i + 1) * th, j * tw:(j + 1) * tw].reshape(x.shape[0], T * th * tw, *x.shape[2:])


def _attend(op, q, k, v, grid, num_cond: int) -> torch.Tensor:
    """The model's calls: one over all tokens, or condition-only plus noisy-over-all. Grids are full; the
    condition/noisy cut is at ``num_cond`` frames of whatever tokens per frame ``q`` holds."""
    if num_cond == 0:
        return op.self_attention(q, k, v, grid, grid)
    T, H, W = grid
    n = num_cond * (q.shape[1] // T)
    cgrid, ngrid = (num_cond, H, W), (T - num_cond, H, W)
    out_c = op.self_attention(q[:, :n], k[:, :n], v[:, :n], cgrid, cgrid)
    out_n = op.self_attention(q[:, n:], k, v, ngrid, grid)
    return torch.cat([out_c, out_n], dim=1)


def _inputs(grid, seed: int):
    g = torch.Generator().manual_seed(seed)
    S = grid[0] * grid[1] * grid[2]
    return tuple(torch.randn(B, S, HEADS, D, generator=g) for _ in range(4))


def _grads(op, q, k, v, w, grid, num_cond):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = _attend(op, q, k, v, grid, num_cond)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _check_op(rank, world, mode, inner, cases):
    from parallel.context_parallel import ring

    cls = RingAttentionOp if mode == "ring" else UlyssesAttentionOp
    for seed, (grid, num_cond, settings) in enumerate(cases):
        settings = dict(settings)
        ring.CHUNK_ELEMS = settings.pop("chunk_elems", 1 << 22)  # small: dense steps split into row chunks
        dtype = settings.pop("dtype", torch.float32)
        split = settings.pop("split_hw", None)
        if split == "cols":
            split = (1, world)
        tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        q, k, v, w = (t.to(dtype) for t in _inputs(grid, seed))
        if inner == "bsa":
            ref_op = BlockSparseAttentionOp(settings["sparsity"], BSA_BLOCK, settings.get("cdf_threshold"), "torch",
                                            settings.get("kv_block_shape"), settings.get("fp32_scores", False))
            cp_op = cls(dist.group.WORLD, "bsa", block_shape=BSA_BLOCK, backend="torch", split_hw=split, **settings)
            dense_out = _attend(AttentionOp(), q, k, v, grid, num_cond)
        else:
            ref_op, cp_op = AttentionOp(), cls(dist.group.WORLD, "dense", split_hw=split)
        # BSA selects blocks in the input dtype (LongCat's rule), so its reference sees the same inputs;
        # its attention math is fp32 either way
        ref_in = (q, k, v, w) if inner == "bsa" else tuple(t.float() for t in (q, k, v, w))
        ref = tuple(t.float() for t in _grads(ref_op, *ref_in, grid, num_cond))
        if inner == "bsa":  # the sparse path is really taken
            assert not torch.allclose(ref[0], dense_out.float(), atol=1e-3)
        layout = cp_op.layout(grid[1], grid[2])
        if split is not None:
            assert layout.split == tuple(split)
        shard = lambda t: _tile(t, grid, layout, rank)  # noqa: E731
        # w is zero on padding, so padded queries get no gradient; their outputs are not compared
        got = _grads(cp_op, shard(q), shard(k), shard(v), shard(w), grid, num_cond)
        real = shard(torch.ones(B, grid[0] * grid[1] * grid[2], 1, 1))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            assert a.dtype == dtype
            a = a.float() * real if name == "out" else a.float()
            torch.testing.assert_close(a, shard(b), **tol, msg=lambda m: f"{mode}/{inner} grid={grid} "
                                       f"num_cond={num_cond} {settings} split={layout.split} {name}: {m}")


@pytest.fixture(scope="module", autouse=True)
def _pools():
    yield
    close_pools()


RAGGED_DENSE, RAGGED_BSA = (3, 5, 3), (5, 7, 5)
DENSE_CASES = [(DENSE_GRID, 0, {}), (DENSE_GRID, 1, {}), (DENSE_GRID, 2, {}),
               (DENSE_GRID, 2, {"chunk_elems": 50}), (DENSE_GRID, 2, {"dtype": torch.bfloat16}),
               # sizes cp does not divide: padded tiles; a split along W; a rank holding only padding
               (RAGGED_DENSE, 1, {}), (RAGGED_DENSE, 2, {"split_hw": "cols"}), ((2, 2, 3), 1, {"split_hw": "cols"})]
BSA_CASES = [(BSA_GRID, 0, {"sparsity": 0.75}), (BSA_GRID, 2, {"sparsity": 0.75}), (BSA_GRID, 1, {"sparsity": 0.5}),
             (BSA_GRID, 2, {"sparsity": 0.75, "cdf_threshold": 0.5}),
             (BSA_GRID, 2, {"sparsity": 0.75, "dtype": torch.bfloat16}),
             (BSA_GRID, 2, {"sparsity": 0.75, "dtype": torch.bfloat16, "fp32_scores": True}),
             (BSA_GRID, 2, {"sparsity": None, "cdf_threshold": 0.6}),
             ((6, 8, 8), 3, {"sparsity": 0.5, "kv_block_shape": (4, 4, 2)}),  # key blocks differ from query blocks
             (RAGGED_BSA, 2, {"sparsity": 0.75}), (RAGGED_BSA, 1, {"sparsity": 0.5, "split_hw": "cols"}),
             ((3, 3, 4), 1, {"sparsity": 0.5, "split_hw": "cols"})]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode,inner", [("ring", "dense"), ("ulysses", "dense"), ("ring", "bsa"), ("ulysses", "bsa")])
def test_context_parallel_attention_matches_single_process(world, mode, inner):
    cases = BSA_CASES if inner == "bsa" else DENSE_CASES
    get_pool(world).run(_check_op, mode, inner, cases)


def _check_hw_tiles(rank, world):
    """cp=4 as 2 x 2 tiles of a ragged grid: ring (dense and BSA) and Ulysses equal one process."""
    _check_op(rank, world, "ring", "bsa", [(RAGGED_BSA, 1, {"sparsity": 0.5, "split_hw": (2, 2)}),
                                            ((4, 6, 9), 0, {"sparsity": 0.75, "split_hw": (2, 2)})])
    _check_op(rank, world, "ring", "dense", [(RAGGED_DENSE, 1, {"split_hw": (2, 2)})])
    _check_op(rank, world, "ulysses", "dense", [(RAGGED_DENSE, 2, {"split_hw": (2, 2)})])


def test_hw_tiles_on_four_ranks():
    get_pool(4).run(_check_hw_tiles)


def test_single_rank_without_process_group_is_plain_attention():
    q, k, v, w = _inputs(DENSE_GRID, 0)
    ref = _grads(AttentionOp(), q, k, v, w, DENSE_GRID, 1)
    got = _grads(RingAttentionOp(None, "dense"), q, k, v, w, DENSE_GRID, 1)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


# -- split / gather and errors -------------------------------------------------------------------

def _check_split_gather_and_errors(rank, world):
    g = torch.Generator().manual_seed(0)
    # 2-D tiles of a padded grid: every rank's tile in place, padding dropped; the same gradient convention
    group = dist.group.WORLD
    layout = choose_layout(5, 7, world, (2, 2), split=(2, world // 2))
    x = torch.randn(2, 3, 5, 7, 4, generator=g)
    w = torch.randn(2, 3, 5, 7, 4, generator=g)
    xr = x.clone().requires_grad_(True)
    tile = split_grid(xr, layout, group)
    (r0, c0), (th, tw), (vr, vc) = layout.offset(rank), layout.tile, layout.valid(rank)
    assert tuple(tile.shape) == (2, 3, th, tw, 4)
    torch.testing.assert_close(tile[:, :, :vr, :vc], x[:, :, r0:r0 + vr, c0:c0 + vc])
    assert not tile[:, :, vr:].any() and not tile[:, :, :, vc:].any()
    full = gather_grid(tile * 3.0, layout, group)
    torch.testing.assert_close(full, 3.0 * x)
    (full * w).sum().backward()
    # this rank's share: only its tile, scaled by cp; the mean over the cp group is the true gradient
    expect = torch.zeros_like(x)
    expect[:, :, r0:r0 + vr, c0:c0 + vc] = world * 3.0 * w[:, :, r0:r0 + vr, c0:c0 + vc]
    torch.testing.assert_close(xr.grad, expect)
    mean = xr.grad.clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, 3.0 * w)

    q = torch.zeros(1, 2 * 2 * 3, world + 1, 8)
    with pytest.raises(ConfigError, match=rf"heads \({world + 1}\).*cp={world}"):
        UlyssesAttentionOp(group, "dense").self_attention(q, q, q, (2, 2, 3), (2, 2, 3))
    with pytest.raises(ConfigError, match="cp_mode"):
        make_context_parallel_op(AttentionOp(), group, "zigzag")
    with pytest.raises(ConfigError, match=rf"cp_split_hw=\[3, 1\].*parallel.cp={world}"):
        RingAttentionOp(group, "bsa", split_hw=(3, 1))
    with pytest.raises(ValueError, match="already context-parallel"):
        make_context_parallel_op(RingAttentionOp(group), group, "ring")

    # device meshes: 1-D, or the cp dimension of a larger mesh
    from torch.distributed.device_mesh import init_device_mesh

    assert dist.get_world_size(resolve_cp_group(init_device_mesh("cpu", (world,)))) == world
    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
        cp_group = resolve_cp_group(mesh)
        assert dist.get_process_group_ranks(cp_group) == [2 * (rank // 2), 2 * (rank // 2) + 1]
        op = make_context_parallel_op(BlockSparseAttentionOp(0.5, (2, 2, 2), None, "torch"), cp_group, "ring")
        assert (op.cp, op.rank, op.name, op.sparsity, op.block_shape) == (2, rank % 2, "bsa", 0.5, (2, 2, 2))


@pytest.mark.parametrize("world", [2, 4])
def test_split_gather_gradients_and_errors(world):
    get_pool(world).run(_check_split_gather_and_errors)
