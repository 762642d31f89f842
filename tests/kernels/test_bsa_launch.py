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
    that mixes heads (loses L2 locality), or that does not start the busiest key blocks first."""
    from kernels.bsa.triton_fwd_bwd import busiest_first

    g = torch.Generator().manual_seed(0)
    BH, nk = 3, 11
    counts = torch.randint(0, 6, (BH * nk,), generator=g, dtype=torch.int32)
    order = busiest_first(counts, nk).long()
    assert order.dtype == torch.long and sorted(order.tolist()) == list(range(BH * nk))
    for h in range(BH):
        seg = order[h * nk:(h + 1) * nk]
        assert ((seg // nk) == h).all()
        c = counts[seg]
        assert (c[:-1] >= c[1:]).all()
        ties = [(int(c[i]), int(seg[i])) for i in range(nk)]
        assert ties == sorted(ties, key=lambda t: (-t[0], t[1]))  # stable: equal counts keep key-block order
