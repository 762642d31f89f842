"""3D block-sparse attention (BSA) for video latents.

High level::

    from kernels.bsa import block_sparse_attention
    out = block_sparse_attention(q, k, v, latent_shape, kv_latent_shape=None, block_shape=(4, 4, 4),
                                 sparsity=0.9375, cdf_threshold=None, backend="auto", return_lse=False)

Lower level (what ring / context-parallel attention composes):
:func:`blockify` / :func:`unblockify` (raster <-> 3D blocks), :func:`pool_blocks` (mean over valid tokens),
:func:`select_blocks` (top-k or CDF rule), :func:`block_attention` (exact attention over listed key blocks,
returns out and lse, differentiable through both, handles ``kv_count == 0``).

Backends: ``"torch"`` (chunked gather + exact attention, CPU and GPU) and ``"triton"`` (forward and
backward kernels, imported lazily so ``import kernels.bsa`` never imports triton).
"""

from .api import block_attention, block_sparse_attention
from .layout import block_valid_mask, blockify, num_blocks, pool_blocks, unblockify
from .select import select_blocks, topk_count

__all__ = [
    "block_sparse_attention",
    "block_attention",
    "blockify",
    "unblockify",
    "pool_blocks",
    "select_blocks",
    "topk_count",
    "num_blocks",
    "block_valid_mask",
]
