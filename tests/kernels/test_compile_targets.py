"""The Triton BSA kernels, compiled for sm_80 (A100) and sm_90 (H100) on the CPU, in every configuration the
dispatcher can choose (kernels/bsa/launch_space.py: dtype x head_dim tile x block tile x PREC x launch options).

Catches, without a GPU: a kernel that no longer compiles for a real target (the interpreter accepts code
that Triton's GPU pipeline rejects), a tile / stage choice that needs more shared memory than a block can
have, register spills (ptxas' report), and 16-bit dots that do not become tensor-core MMAs (wgmma on sm_90,
mma.sync on sm_80). The compilation runs in a fresh interpreter because this process may have imported
triton with TRITON_INTERPRET=1 (test_bsa.py sets it), and then kernels cannot be compiled here. The
fp16/bf16 space (44 compilations, 2 processes) takes ~30 s on an idle 2-core machine; the fp32
correctness path (12 large compilations) is a slow-marked test, compiled in the same run when it is selected.
Skipped with the reason when ptxas is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.optional import require

from kernels.bsa.compile_check import H100, occupancy, problems
from kernels.bsa.launch_space import ARCHS, KERNELS, kernel_configs

SIXTEEN_BIT = ["float16", "bfloat16"]
# Idle 2-core machine: ~1 s of CPU per fp16/bf16 compilation; on a shared, overloaded one 10x that.
COMPILE_TIMEOUT_S = 1500
pytestmark = pytest.mark.timeout(COMPILE_TIMEOUT_S + 60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compile(tmp_path_factory, dtypes):
    """Run kernels.bsa.compile_check for ``dtypes`` in a fresh interpreter; its records (or skip)."""
    require("triton")
    out = tmp_path_factory.mktemp("compile") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    # Own session, so that the compiler's worker processes go too if the test is interrupted or times out.
    proc = subprocess.Popen([sys.executable, "-m", "kernels.bsa.compile_check", "--json", str(out), "--jobs", "2",
                             "--dtype", *dtypes], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=COMPILE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    data = json.loads(out.read_text())
    if "skip" in data:  # the Triton install ships no ptxas (a non-CUDA build): nothing can be compiled to cubin
        from tests.optional import in_ci

        if in_ci():  # Justified outside CI only: CI's Linux triton ships ptxas, so a skip there hides a break
            pytest.fail(f"CI is set but {data['skip']}", pytrace=False)
        pytest.skip(data["skip"])
    return data["records"]


FP32_TEST = "test_fp32_correctness_path_compiles_and_fits"


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """Every record of one compile_check run for the dtypes the selected tests need: fp16/bf16, and fp32 when
    its (slow) test is selected. One run, not one per dtype group: each costs an interpreter and a pool
    importing torch and triton, and the pool's last large compilations leave a core idle."""
    items = request.session.items
    dtypes = (SIXTEEN_BIT * any("records" in getattr(i, "fixturenames", ()) for i in items)
              + ["float32"] * any(i.name == FP32_TEST for i in items))
    return _compile(tmp_path_factory, dtypes)


@pytest.fixture(scope="module")
def records(compiled):
    return [r for r in compiled if r["dtype"] in SIXTEEN_BIT]


def test_every_dispatcher_configuration_is_compiled(records):
    assert sorted((r["name"], r["arch"]) for r in records) == sorted(
        (c.name, arch) for arch in ARCHS for c in kernel_configs(arch, SIXTEEN_BIT))
    assert {r["kernel"] for r in records} == set(KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_fits_does_not_spill_and_uses_tensor_cores(records, kernel, arch):
    mine = [r for r in records if r["kernel"] == kernel and r["arch"] == arch]
    assert mine
    bad = [msg for r in mine for msg in problems(r)]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_fp32_correctness_path_compiles_and_fits(compiled):
    """fp32 (exact FMA dots): compiles for both targets and fits shared memory; spills are reported only.

    Also shows the MMA check can fail: these dots are FMAs and are reported so. ~2 min (large kernels)."""
    recs = [r for r in compiled if r["dtype"] == "float32"]
    assert sorted((r["name"], r["arch"]) for r in recs) == sorted(
        (c.name, arch) for arch in ARCHS for c in kernel_configs(arch, ["float32"]))
    bad = [msg for r in recs for msg in problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["mma"] == "fma" and r["wgmma_dots"] == 0 for r in recs)


def _record(**kw):
    base = dict(name="fwd-x", arch=90, dtype="bfloat16", error=None, shared=1024, regs=128, spill_stores=0,
                spill_loads=0, mma="wgmma", dots=2, wgmma_dots=2)
    return {**base, **kw}


def test_problems_flags_each_rule():
    assert problems(_record()) == []
    assert "does not compile" in problems(_record(error="PTXASError: boom"))[0]
    assert "shared memory" in problems(_record(shared=H100.smem_per_block + 1))[0]
    assert "spills" in problems(_record(spill_stores=8, spill_loads=8))[0]
    assert "wgmma" in problems(_record(wgmma_dots=1))[0]
    assert "mma.sync" in problems(_record(arch=80, mma="fma", wgmma_dots=0))[0]
    assert problems(_record(dtype="float32", mma="fma", wgmma_dots=0)) == []
    assert problems(_record(dtype="float32", mma="fma", wgmma_dots=0, spill_stores=8, spill_loads=8)) == []


def test_occupancy_follows_cuda_rules():
    # 128 registers x 32 threads = 4096 per warp: 16 warps fit the 64K register file -> 4 blocks of 4 warps.
    assert occupancy(H100, regs=128, shared=0, warps=4) == (4, 0.25, "registers")
    # 96 KB + 1 KB reserved per block: two fit in the H100's 228 KB.
    assert occupancy(H100, regs=32, shared=96 * 1024, warps=4) == (2, 0.125, "shared memory")
    # 255 registers round up to 256 per thread (8192 per warp): 8 warps -> one block of 8 warps.
    assert occupancy(H100, regs=255, shared=0, warps=8) == (1, 0.125, "registers")
