"""Tile shapes and launch options of the Triton BSA kernels: the one list the dispatcher picks from.

``triton_fwd_bwd`` builds its ``triton.autotune`` configs from :func:`launch_options` and its tiles from
:func:`tile_shape`; ``tests/kernels/test_compile_targets.py`` and ``bench/kernel_report.py`` compile every
entry of :func:`kernel_configs` for sm_80 and sm_90. Keeping both sides on this module is what makes
"every configuration the dispatcher can choose compiles" a checkable statement. No triton import here, so
the test process can enumerate the space without importing triton (which would fix its interpreter mode).

The space (documented in the README's Kernels section):

* tiles: one 3D block of at most 64 tokens per tile; on a GPU ``BLOCK_M = 64`` (a block of fewer tokens is
  padded and masked: the published 4x4x4 block is exactly 64, and 64 rows is one Hopper warpgroup MMA);
  ``BLOCK_D = 64`` for head_dim <= 64, ``128`` for head_dim <= 128. The interpreter uses the tightest
  power-of-2 tiles (>= 16) instead, which only keeps the CPU tests fast (same masking code).
* dot precision (``PREC``): fp16/bf16 dots run on tensor cores (wgmma on sm_90, mma.sync on sm_80; Triton
  ignores ``PREC`` for them, ``"tf32"`` is passed). fp32 inputs use exact ``"ieee"`` dots: fp32 is the
  correctness path (tests, debugging), not a training dtype. On a GPU its 64x128 fp32 tiles do not fit in
  registers (ptxas spills kilobytes per thread whatever the warps, stages or TF32 variant), so fp32 has one
  launch option and the compile test checks it compiles and fits shared memory, reports its spills and does
  not fail on them (``SPILLS_ALLOWED``); it is compiled by a slow-marked test (large kernels, ~10 s each).
* launch options ``(num_warps, num_stages)``, autotuned per kernel, dtype, tile and GPU on first use, from
  ``LAUNCH_16BIT`` (chosen from ptxas reports at head_dim 128, bf16: the candidates that do not spill.
  4 warps spill in the dk/dv kernel on both targets and in dq on sm_80; 2 stages spill in dk/dv on sm_80;
  3 stages also fit but were left out to keep the space small, untimed without a GPU). GPUs other than
  sm_90 use the sm_80 list. Under ``TRITON_INTERPRET=1`` the first entry is used and nothing is tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
DTYPES = ("float32", "float16", "bfloat16")
ARCHS = (80, 90)
MAX_BLOCK_TOKENS = 64
MAX_HEAD_DIM = 128
GPU_BLOCK_M = 64
GPU_BLOCK_DS = (64, 128)

# (num_warps, num_stages) per kernel and target for fp16/bf16; the first entry is the interpreter's choice.
LAUNCH_16BIT = {
    80: {"fwd": ((4, 2), (8, 2)), "bwd_dq": ((8, 1), (8, 2)), "bwd_dkdv": ((8, 1),)},
    90: {"fwd": ((4, 2), (8, 2)), "bwd_dq": ((8, 1), (8, 2)), "bwd_dkdv": ((8, 1), (8, 2))},
}
LAUNCH_FP32 = ((8, 1),)
SPILLS_ALLOWED = ("float32",)


@dataclass(frozen=True)
class KernelConfig:
    """One compilation of one kernel: what ``triton.compile`` is asked for."""

    kernel: str          # one of KERNELS
    dtype: str           # one of DTYPES (q, k, v, out, grads)
    block_m: int         # tokens per tile (one 3D block, padded)
    block_d: int         # head_dim tile (padded)
    prec: str            # tl.dot input_precision
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return (f"{self.kernel}-{self.dtype}-m{self.block_m}-d{self.block_d}-{self.prec}"
                f"-w{self.num_warps}s{self.num_stages}")


def check_supported(block_tokens: int, head_dim: int) -> None:
    """Raise one clear line when a block or head size is outside what the kernels are built for."""
    if block_tokens > MAX_BLOCK_TOKENS or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"Triton BSA kernels take blocks of at most {MAX_BLOCK_TOKENS} tokens and head_dim <= "
                         f"{MAX_HEAD_DIM} (the compile-checked space); got {block_tokens} tokens per block, "
                         f"head_dim {head_dim}: use a smaller block_shape or backend='torch'")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tile_shape(block_tokens: int, head_dim: int, interpret: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_D)`` for a block of ``block_tokens`` tokens and ``head_dim`` channels."""
    check_supported(block_tokens, head_dim)
    if interpret:
        return max(16, _next_pow2(block_tokens)), max(16, _next_pow2(head_dim))
    return GPU_BLOCK_M, next(d for d in GPU_BLOCK_DS if head_dim <= d)


def dot_precision(dtype: str) -> str:
    return "ieee" if dtype == "float32" else "tf32"  # input_precision is ignored for 16-bit inputs


def target_arch(capability: int) -> int:
    """The launch-space table a GPU of compute capability ``capability`` (e.g. 86, 90) uses."""
    return 90 if capability >= 90 else 80


def launch_options(kernel: str, dtype: str, arch: int) -> tuple[tuple[int, int], ...]:
    """The ``(num_warps, num_stages)`` candidates autotuned for ``kernel`` on inputs of ``dtype``."""
    return LAUNCH_FP32 if dtype == "float32" else LAUNCH_16BIT[target_arch(arch)][kernel]


def kernel_configs(arch: int, dtypes=DTYPES) -> list[KernelConfig]:
    """Every (kernel, dtype, tile, precision, launch options) the GPU dispatcher can choose on ``sm_<arch>``."""
    return [KernelConfig(kernel, dtype, GPU_BLOCK_M, block_d, dot_precision(dtype), warps, stages)
            for kernel in KERNELS for dtype in dtypes for block_d in GPU_BLOCK_DS
            for warps, stages in launch_options(kernel, dtype, arch)]
