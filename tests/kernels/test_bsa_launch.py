"""Host-side launch decisions of the Triton BSA kernels: the launch space and the dk/dv program order.

The kernels' numerics are tested in test_bsa.py (interpreter, against dense attention); these check the
pieces that decide what is launched, which the interpreter tests would not notice if they went wrong in a
way that only costs speed or only shows on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.optional import require

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


_PRUNE_PROBE = """
import json, torch
from kernels.bsa import triton_fwd_bwd as t
out = {}
for cap in [(8, 0), (8, 6), (9, 0)]:
    torch.cuda.get_device_capability = lambda device=None, cap=cap: cap
    for name, tuned in t._TUNED.items():
        for dtype in ("float32", "float16", "bfloat16"):
            kept = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(1, dtype=getattr(torch, dtype))})
            out[f"{cap[0]}{cap[1]}-{name}-{dtype}"] = sorted([c.num_warps, c.num_stages] for c in kept)
print(json.dumps(out))
"""


def test_autotuner_benchmarks_only_the_launch_space_of_the_device():
    """The GPU autotuner (built only without the interpreter, so probed in a fresh process with a faked
    compute capability) keeps exactly launch_space's candidates for the kernel, dtype and target; catches
    a tuner that would try a configuration the compile test never checked (e.g. one that spills)."""
    import json
    import os
    import subprocess
    import sys

    require("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PRUNE_PROBE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, options in kept.items():
        cap, name, dtype = key.split("-")
        assert options == sorted(list(o) for o in launch_options(name, dtype, int(cap))), key
