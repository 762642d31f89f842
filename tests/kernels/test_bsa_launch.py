"""Host-side launch decisions of the Triton BSA kernels: the launch space and the dk/dv program order.

The kernels' numerics are tested in test_bsa.py (interpreter, against dense attention); these check the
pieces that decide what is launched, which the interpreter tests would not notice if they went wrong in a
way that only costs speed or only shows on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernels.bsa.launch_space import (ARCHS, DTYPES, KERNELS, LAUNCH_16BIT, check_supported, kernel_configs,
                                      launch_options, target_arch, tile_shape)


def test_gpu_tiles_cover_published_and_small_models():
    assert tile_shape(64, 128, interpret=False) == (64, 128)   # 4x4x4 blocks, head_dim 128 (13.6B model)
    assert tile_shape(8, 32, interpret=False) == (64, 64)      # 2x2x2 blocks, tiny model: padded tiles
    assert tile_shape(18, 16, interpret=True) == (32, 16)      # interpreter: tightest powers of 2


def test_unsupported_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="block_shape or backend='torch'"):
        check_supported(128, 64)
    with pytest.raises(ValueError, match="head_dim 256"):
        tile_shape(64, 256, interpret=False)


def test_launch_space_is_what_the_compile_test_enumerates():
    """Each (kernel, dtype, arch) has candidates, and kernel_configs lists exactly them."""
    for arch in ARCHS:
        listed = {(c.kernel, c.dtype, c.num_warps, c.num_stages) for c in kernel_configs(arch)}
        expected = {(k, d, w, s) for k in KERNELS for d in DTYPES for w, s in launch_options(k, d, arch)}
        assert listed == expected and all(launch_options(k, d, arch) for k in KERNELS for d in DTYPES)
    assert target_arch(86) == 80 and target_arch(89) == 80 and target_arch(90) == 90 and target_arch(100) == 90
    assert launch_options("bwd_dkdv", "bfloat16", 86) == LAUNCH_16BIT[80]["bwd_dkdv"]


def test_dkdv_order_is_per_head_busiest_first():
    """Catches an order that is not a permutation (a key block's dk/dv never written, or written twice),
    that interleaves heads (loses L2 locality), or that does not start the busiest key blocks first."""
    from kernels.bsa.triton_fwd_bwd import busiest_first

    g = torch.Generator().manual_seed(0)
    BH, nk = 3, 11
    counts = torch.randint(0, 6, (BH * nk,), generator=g, dtype=torch.int32)
    order = busiest_first(counts, nk).long()
    assert sorted(order.tolist()) == list(range(BH * nk))
    segs = order.view(BH, nk)
    heads = segs[:, 0] // nk
    assert ((segs // nk) == heads[:, None]).all()                    # one head at a time
    busiest = counts.view(BH, nk).max(dim=1).values[heads]
    assert (busiest[:-1] >= busiest[1:]).all()                       # heads by their busiest key block
    for seg in segs:
        pairs = [(int(counts[i]), int(i)) for i in seg]
        assert pairs == sorted(pairs, key=lambda t: (-t[0], t[1]))  # busiest first; ties keep key-block order
