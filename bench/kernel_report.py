"""Resources of the Triton BSA kernels compiled for sm_80 (A100) and sm_90 (H100), without a GPU.

    python bench/kernel_report.py             # ~1-2 min on 2 cores; prints the tables, rewrites their RESULTS.md section
    python bench/kernel_report.py --autotune  # on a GPU: what triton.autotune picked per kernel, dtype and tile

Compiles every configuration the dispatcher can choose (``kernels.bsa.launch_space.kernel_configs``) with
``kernels.bsa.compile_check`` and tabulates, per kernel and target: shared memory per block, registers per
thread and spill bytes (ptxas' report), the MMA instruction the dots became and how many of the kernel's dots
are Hopper warpgroup MMAs, and the occupancy that implies (resident blocks per SM, share of the SM's 64 warp
slots, and the resource that limits it) on the A100 for sm_80 and the H100 for sm_90. Any configuration
that fails the compile test's rules is listed under the tables. Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels.bsa.compile_check import GPU_OF_ARCH, REPRESENTATIVE, compile_all, problems, ptxas_missing  # noqa: E402
from kernels.bsa.launch_space import KERNELS  # noqa: E402

KERNEL_TITLES = {"fwd": "forward", "bwd_dq": "backward dq", "bwd_dkdv": "backward dk/dv"}


def tables(records) -> str:
    import triton

    lines = [f"Produced by `python bench/kernel_report.py` on {platform.processor() or platform.machine()} (no GPU), "
             f"triton {triton.__version__}, {time.strftime('%Y-%m-%d')}. Integer arguments specialised as at the "
             f"480p shape ({REPRESENTATIVE['n_blocks']} blocks, {REPRESENTATIVE['heads']} heads, "
             f"{REPRESENTATIVE['kept']} kept). Shared memory = Triton's per-block allocation (the driver adds "
             "1 KB); registers and spills from ptxas -v; occupancy = resident blocks per SM and the share of "
             "the SM's 64 warp slots, with the limiting resource (CUDA occupancy rules: registers allocated "
             "per warp in units of 256).\n"]
    for arch in sorted({r["arch"] for r in records}):
        gpu = GPU_OF_ARCH[arch]
        for kernel in KERNELS:
            rows = [r for r in records if r["arch"] == arch and r["kernel"] == kernel]
            lines.append(f"### {KERNEL_TITLES[kernel]}, sm_{arch} (occupancy on the {gpu.name})\n")
            lines.append("| dtype | head_dim tile | warps x stages | shared KB | regs/thread | spills B | MMA "
                         "| wgmma dots | blocks/SM | occupancy | limited by |")
            lines.append("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
            for r in rows:
                if r["error"]:
                    lines.append(f"| {r['dtype']} | {r['block_d']} | {r['num_warps']} x {r['num_stages']} "
                                 f"| does not compile: {r['error']} | | | | | | | |")
                    continue
                lines.append(f"| {r['dtype']} | {r['block_d']} | {r['num_warps']} x {r['num_stages']} "
                             f"| {r['shared'] / 1024:.0f} | {r['regs']} | {r['spill_stores']} | {r['mma']} "
                             f"| {r['wgmma_dots']}/{r['dots']} | {r['blocks_per_sm']} | {r['occupancy']:.1%} "
                             f"| {r['occupancy_limiter']} |")
            lines.append("")
    bad = [msg for r in records for msg in problems(r)]
    lines.append("Problems (the compile test fails on these): " + ("none." if not bad else ""))
    lines.extend(f"- {msg}" for msg in bad)
    half = [r for r in records if not r["error"] and r["dtype"] != "float32"]
    fp32 = [r for r in records if not r["error"] and r["dtype"] == "float32"]
    if half:
        limiters = sorted({r["occupancy_limiter"] for r in half})
        lines.append(f"\nReading. fp16/bf16: {len(half)} compilations, at most {max(r['shared'] for r in half) / 1024:.0f} KB "
                     f"of shared memory per block (the A100 allows 163, the H100 227), "
                     f"{max(r['spill_stores'] for r in half)} B of spills, every dot a wgmma on sm_90 and mma.sync on "
                     f"sm_80. Occupancy is {min(r['occupancy'] for r in half):.1%}-{max(r['occupancy'] for r in half):.1%} "
                     f"of the warp slots (1-{max(r['blocks_per_sm'] for r in half)} blocks per SM), limited by "
                     f"{' and '.join(limiters)}: the fp32 accumulators of 64 x head_dim tiles (two of them in dk/dv) "
                     "live in registers, as in flash-attention kernels, which also run one or two CTAs per SM and "
                     "hide latency with warpgroup MMAs and pipelined loads rather than occupancy.")
    if fp32:
        lines.append(f"fp32 (exact FMA dots, the correctness path): spills up to "
                     f"{max(r['spill_stores'] for r in fp32):,} B per thread, which the compile test reports but "
                     "does not fail on (kernels/bsa/launch_space.py says why); not for training.")
    return "\n".join(lines) + "\n"


def autotune_on_gpu() -> str:
    """On a GPU: run each kernel once per 16-bit dtype and head_dim at the 480p block count (8 heads) and
    report what ``triton.autotune`` chose (``--autotune``; bench/gpu_check.sh runs it)."""
    import torch

    from kernels.bsa import block_attention
    from kernels.bsa.triton_fwd_bwd import autotuned_choices

    dev = torch.device("cuda")
    n, bs, H, K = REPRESENTATIVE["n_blocks"], 64, 8, REPRESENTATIVE["kept"]
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            q, k, v = (torch.randn(1, n, bs, H, D, device=dev, dtype=dtype, generator=g).requires_grad_()
                       for _ in range(3))
            valid = torch.ones(n, bs, dtype=torch.bool, device=dev)
            idx = torch.argsort(torch.rand(1, H, n, n, device=dev, generator=g), dim=-1)[..., :K].int()
            cnt = torch.full((1, H, n), K, dtype=torch.int32, device=dev)
            out, lse = block_attention(q, k, v, valid, valid, idx, cnt, backend="triton")
            out.float().square().sum().backward()
    torch.cuda.synchronize()
    lines = [f"### Autotuned launch options on {torch.cuda.get_device_name()}\n",
             "| kernel | tuning key (BLOCK_M, BLOCK_D, PREC, dtypes) | num_warps x num_stages |", "| --- | --- | --- |"]
    for kernel, choices in autotuned_choices().items():
        for key, (w, st) in sorted(choices.items(), key=str):
            lines.append(f"| {KERNEL_TITLES[kernel]} | {key[:3]} {key[3]} | {w} x {st} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--autotune" in sys.argv:
        body = autotune_on_gpu()
        print(body)
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from bsa_model import write_results

        write_results(body, title="## BSA kernels autotuned on a GPU")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    reason = ptxas_missing()
    if reason:
        print(f"cannot compile for sm_80 / sm_90 here: {reason}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bsa-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        records = compile_all(jobs=min(2, os.cpu_count() or 1))
    body = tables(records)
    print(body)
    print(f"{len(records)} compilations in {time.perf_counter() - t0:.0f} s")
    if "--no-write" not in sys.argv:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from bsa_model import write_results

        write_results(body, title="## BSA kernels compiled for sm_80 / sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
