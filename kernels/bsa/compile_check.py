"""Compile the Triton BSA kernels for an NVIDIA GPU on a machine without one, and read what they use.

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`` runs
Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) on the CPU. For every entry of
:func:`kernels.bsa.launch_space.kernel_configs` and each target this module records, from the compile
itself: the shared memory a block needs (Triton's allocation, launched as dynamic shared memory), registers
per thread and spill bytes (ptxas' own report, ``-v`` log), the tensor-core instruction the dots became
(``wgmma`` on sm_90, ``mma.sync`` on sm_80, ``fma`` when none), how many of the kernel's dots are
warpgroup MMAs, and the occupancy those resources allow on an A100 (sm_80) or H100 (sm_90).
:func:`problems` turns a record into the failures the compile test asserts on: does not compile, more
shared memory than a block may have, spills (except the fp32 correctness path, see launch_space), and
fp16/bf16 dots that are not tensor-core MMAs (every dot a wgmma on sm_90, mma.sync on sm_80).

Signatures are specialised the way Triton's JIT specialises a real launch (pointers 16-byte aligned,
integers divisible by 16 marked so, an integer equal to 1 made a constant), from the same argument lists the
launches use (``triton_fwd_bwd.fwd_args`` etc.) applied to meta tensors of the published 480p shape.

Needs a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` must build real JIT functions) and the
ptxas that ships with triton (``triton/backends/nvidia/bin``); :func:`ptxas_missing` says when it is not
there. ``python -m kernels.bsa.compile_check`` prints one line per compilation; ``--json PATH`` writes the
records (used by the compile test, which runs this in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from .launch_space import ARCHS, DTYPES, SPILLS_ALLOWED, KernelConfig, kernel_configs


@dataclass(frozen=True)
class GPUSpec:
    """Per-SM limits of a GPU (CUDA programming guide, compute capability tables)."""

    name: str
    arch: int
    sms: int
    smem_per_sm: int            # bytes usable by blocks on one SM
    smem_per_block: int         # opt-in maximum for one block
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the driver reserves 1 KB per block on sm_80+
    reg_alloc_unit: int = 256   # registers are allocated per warp in units of 256


A100 = GPUSpec("A100 SXM", 80, 108, 164 * 1024, 163 * 1024)
H100 = GPUSpec("H100 SXM", 90, 132, 228 * 1024, 227 * 1024)
GPU_OF_ARCH = {80: A100, 90: H100}

# Published 480p 93-frame latents (24 x 30 x 52 tokens) in 4x4x4 blocks: 6 x 8 x 13 = 624 blocks; 32 heads;
# sparsity 0.9375 keeps 39 key blocks per query block. Only the integer specialisations depend on it.
REPRESENTATIVE = {"B": 1, "n_blocks": 624, "heads": 32, "kept": 39}

_PTR_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
              torch.int32: "i32", torch.int64: "i64"}


def ptxas_missing() -> str | None:
    """Why sm_80 / sm_90 cubins cannot be built here (None when ptxas is available)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # no triton, or a triton without the NVIDIA backend
        return f"triton's NVIDIA backend is not importable: {e}"
    for arch in ARCHS:
        try:
            get_ptxas(arch)
        except RuntimeError as e:
            return f"no ptxas for sm_{arch} ({e}; triton ships it in triton/backends/nvidia/bin)"
    return None


def occupancy(gpu: GPUSpec, regs: int, shared: int, warps: int) -> tuple[int, float, str]:
    """Resident blocks per SM, the fraction of the SM's warp slots they fill, and the limiting resource."""
    regs_per_warp = math.ceil(regs * 32 / gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    limits = {
        "registers": (gpu.regs_per_sm // regs_per_warp) // warps if regs else gpu.max_blocks_per_sm,
        "shared memory": gpu.smem_per_sm // (shared + gpu.smem_reserved_per_block),
        "warps": gpu.max_warps_per_sm // warps,
        "blocks": gpu.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return blocks, blocks * warps / gpu.max_warps_per_sm, limiter


def representative_args(cfg: KernelConfig):
    """The kernel's argument tuple at the published shape (meta tensors: no memory), and its constexprs."""
    from . import triton_fwd_bwd as tk

    dt = getattr(torch, cfg.dtype)
    B, n, H, K = (REPRESENTATIVE[k] for k in ("B", "n_blocks", "heads", "kept"))
    bs, D = cfg.block_m, cfg.block_d

    def t(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k, v, o, do, g1, g2 = (t(B, n, bs, H, D) for _ in range(7))
    lse, delta = t(B, H, n, bs, dtype=torch.float32), t(B, H, n, bs, dtype=torch.float32)
    valid = t(n, bs, dtype=torch.uint8)
    idx, cnt = t(B, H, n, K, dtype=torch.int32), t(B, H, n, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    if cfg.kernel == "fwd":
        args = tk.fwd_args(q, k, v, o, lse, valid, valid, idx, cnt, scale)
    elif cfg.kernel == "bwd_dq":
        args = tk.dq_args(q, k, v, do, g1, lse, delta, valid, valid, idx, cnt, scale)
    else:
        q_ids = t(B * H * n * K, dtype=torch.int32)
        off, qcnt, order = (t(B * H * n, dtype=torch.int32) for _ in range(3))
        args = tk.dkdv_args(q, k, v, do, g1, g2, lse, delta, valid, valid, q_ids, off, qcnt, order, scale)
    return tk.KERNELS[cfg.kernel], args, {"BLOCK_M": cfg.block_m, "BLOCK_D": cfg.block_d, "PREC": cfg.prec}


def specialize(fn, args, constexprs: dict):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, following the JIT's specialisation rules."""
    names = list(fn.arg_names)
    runtime = [n for n in names if n not in constexprs]
    if len(runtime) != len(args):
        raise TypeError(f"{fn.__name__}: {len(args)} arguments for {len(runtime)} runtime parameters {runtime}")
    values = dict(zip(runtime, args))
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        a = values[name]
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + _PTR_TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # CUDA allocations are (at least) 256-byte aligned
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={a!r}")
    return signature, consts, attrs


_DOT = re.compile(r"= tt\.dot ")
_WGMMA_DOT = re.compile(r"= ttng\.warp_group_dot ")


def _ptxas_report(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read ptxas' -v report:\n{log}")
    return {"regs": int(regs.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3))}


def compile_one(cfg: KernelConfig, arch: int) -> dict:
    """Compile one configuration for ``sm_<arch>``; a record of what it uses (``error`` set if it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    gpu = GPU_OF_ARCH[arch]
    rec = {**dataclasses.asdict(cfg), "name": cfg.name, "arch": arch, "gpu": gpu.name, "error": None}
    t0 = time.perf_counter()
    try:
        fn, args, meta = representative_args(cfg)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError("TRITON_INTERPRET=1 was set when triton was imported: kernels are interpreted here")
        signature, consts, attrs = specialize(fn, args, meta)
        triton.knobs.nvidia.dump_ptxas_log = True     # ptxas -v goes to stdout: its register / spill report
        triton.knobs.compilation.always_compile = True  # a disk-cache hit would skip ptxas and its report
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        rec.update(_ptxas_report(log.getvalue()))
        ptx = kernel.asm["ptx"]
        rec["shared"] = int(kernel.metadata.shared)
        rec["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync", ptx)
                      else "fma")
        rec["dots"] = len(_DOT.findall(kernel.asm["ttir"]))
        rec["wgmma_dots"] = len(_WGMMA_DOT.findall(kernel.asm["ttgir"]))
        blocks, occ, limiter = occupancy(gpu, rec["regs"], rec["shared"], cfg.num_warps)
        rec.update(blocks_per_sm=blocks, occupancy=occ, occupancy_limiter=limiter)
    except Exception as e:  # reported, and turned into a failure by problems()
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    return rec


def problems(rec: dict) -> list[str]:
    """What is wrong with one compile record (empty when the configuration is fit to run)."""
    where = f"{rec['name']} on sm_{rec['arch']}"
    if rec.get("error"):
        return [f"{where}: does not compile ({rec['error']})"]
    out = []
    limit = GPU_OF_ARCH[rec["arch"]].smem_per_block
    if rec["shared"] > limit:
        out.append(f"{where}: needs {rec['shared']} B of shared memory per block, the target has {limit}")
    if (rec["spill_stores"] or rec["spill_loads"]) and rec["dtype"] not in SPILLS_ALLOWED:
        out.append(f"{where}: spills registers ({rec['spill_stores']} B stores, {rec['spill_loads']} B loads "
                   f"at {rec['regs']} registers/thread)")
    sixteen_bit = rec["dtype"] in ("float16", "bfloat16")
    if sixteen_bit and rec["arch"] >= 90 and rec["wgmma_dots"] < rec["dots"]:
        out.append(f"{where}: only {rec['wgmma_dots']} of its {rec['dots']} dots are tensor-core warpgroup MMAs "
                   f"(wgmma); PTX has {rec['mma']}")
    if sixteen_bit and rec["arch"] < 90 and rec["mma"] != "mma.sync":
        out.append(f"{where}: 16-bit dots did not become tensor-core mma.sync (PTX has {rec['mma']})")
    return out


def summary_line(rec: dict) -> str:
    if rec["error"]:
        return f"sm_{rec['arch']} {rec['name']:<44} ERROR {rec['error']}"
    return (f"sm_{rec['arch']} {rec['name']:<44} smem {rec['shared']:>6} regs {rec['regs']:>3} "
            f"spill {rec['spill_stores']:>4} {rec['mma']:<8} dots {rec['wgmma_dots']}/{rec['dots']} wgmma  "
            f"occ {rec['occupancy']:.1%} ({rec['occupancy_limiter']})  {rec['compile_s']:.1f}s")


def compile_all(archs=ARCHS, dtypes=DTYPES, jobs: int = 1, progress=None, configs=None) -> list[dict]:
    """Compile the dispatcher's configurations of ``dtypes`` (or ``configs``) for every target, ``jobs``
    processes at a time; records in input order. ``progress`` (e.g. ``print``) gets a line per record."""
    work = [(cfg, arch) for arch in archs
            for cfg in (configs if configs is not None else kernel_configs(arch, dtypes))]
    records = []
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            results = (compile_one(cfg, arch) for cfg, arch in work)
        else:
            results = stack.enter_context(ProcessPoolExecutor(max_workers=jobs)).map(compile_one, *zip(*work))
        for rec in results:
            records.append(rec)
            if progress is not None:
                progress(summary_line(rec))
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the compile records here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes (default: 2)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    reason = ptxas_missing()
    if reason:
        print(f"SKIP: {reason}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"skip": reason}, f)
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bsa-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compiled fresh; inherited by the worker processes
        records = compile_all(archs=a.arch, dtypes=a.dtype, jobs=a.jobs, progress=lambda line: print(line, flush=True))
    wall = time.perf_counter() - t0
    bad = [msg for rec in records for msg in problems(rec)]
    print(f"{len(records)} compilations in {wall:.0f} s with {a.jobs} process(es); {len(bad)} problem(s)")
    for msg in bad:
        print("PROBLEM", msg)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"records": records, "wall_s": wall, "jobs": a.jobs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
