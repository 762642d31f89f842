"""3D block-sparse attention (BSA) for video latents.

High level::

    from kernels.bsa import block_sparse_attention
    out = block_sparse_attention(q, k, v, latent_shape, kv_latent_shape=None, block_shape=(4, 4, 4),
                                 sparsity=0.9375, cdf_threshold=None, backend="auto", return_lse=False,
                                 kv_block_shape=None, fp32_scores=False)

Lower level (what ring / context-parallel attention composes):
:func:`blockify` / :func:`unblockify` (raster <-> 3D blocks), :func:`pool_blocks` (mean over valid tokens),
:func:`select_blocks` (LongCat's top-k / CDF rule; see ``select.py``), :func:`refine_selection`
(a selection on query/key blocks of different shapes, in their common finer blocks), :func:`block_attention`
(exact attention over listed key blocks, returns out and lse, differentiable through both, handles
``kv_count == 0``), :func:`local_selection` (restrict a global selection to the key blocks one rank holds).

Context parallelism (ring attention) with these pieces, shards holding whole 3D blocks (e.g. T split in
multiples of ``bt``, so a rank's key blocks are a contiguous range ``[b0, b1)`` of the global block order)::

    qb, q_valid = blockify(q_local, q_latent_local, block)         # this rank's query blocks
    kb, k_valid = blockify(k_local, kv_latent_local, block)        # this rank's key blocks
    kp = all_gather(pool_blocks(kb, k_valid))                      # tiny; concatenated in global order
    kv_index, kv_count = select_blocks(pool_blocks(qb, q_valid), kp, sparsity)   # == single-GPU selection
    for each key shard [b0, b1) visiting this rank:
        idx, cnt = local_selection(kv_index, kv_count, b0, b1)
        out_i, lse_i = block_attention(qb, kb_shard, vb_shard, q_valid, k_valid_shard, idx, cnt)
    merge: lse = logaddexp over i; out = sum_i out_i * exp(lse_i - lse)   (guard rows where lse = -inf)

Backward accepts d(lse), and ignores it on rows whose lse is -inf, so a NaN produced there by a naive
merge does not leak into the gradients.

Backends: ``"torch"`` (chunked gather + exact attention, CPU and GPU) and ``"triton"`` (forward and
backward kernels, imported lazily so ``import kernels.bsa`` never imports triton).
"""

from .api import block_attention, block_sparse_attention
from .layout import block_valid_mask, blockify, common_block, num_blocks, pool_blocks, unblockify
from .select import local_selection, refine_selection, select_blocks, topk_count

__all__ = [
    "block_sparse_attention",
    "block_attention",
    "blockify",
    "unblockify",
    "pool_blocks",
    "select_blocks",
    "local_selection",
    "refine_selection",
    "common_block",
    "topk_count",
    "num_blocks",
    "block_valid_mask",
]
