"""The DiT's attention operator from its config (``model.attention``, ``model.bsa``).

The operator protocol and the single-process operators live in ``kernels.attention_op`` (the lowest
layer, shared with ``parallel``); this module only maps a ``DiTConfig`` to one of them.
"""

from __future__ import annotations

from kernels.attention_op import AttentionOp, BlockSparseAttentionOp, Grid, uses_block_sparse

__all__ = ["AttentionOp", "BlockSparseAttentionOp", "Grid", "build_attention_op", "uses_block_sparse"]


def build_attention_op(cfg) -> AttentionOp:
    """The operator a ``DiTConfig`` asks for."""
    if cfg.attention == "bsa":
        return BlockSparseAttentionOp(cfg.bsa.sparsity, tuple(cfg.bsa.chunk_3d_shape_q), cfg.bsa.cdf_threshold,
                                      cfg.bsa.backend, kv_block_shape=tuple(cfg.bsa.chunk_3d_shape_k),
                                      fp32_scores=cfg.bsa.fp32_scores)
    return AttentionOp()
