"""The attention-operator protocol: the one object through which every attention of a model runs.

It lives in ``kernels`` (the lowest layer) so that the model (``lcv_train.model``, whose blocks call
``model.attention_op`` and never an attention function) and ``parallel`` (whose context-parallel operators
wrap these) both depend on it, and ``parallel`` never imports the model. Swapping the object is how
block-sparse attention (``BlockSparseAttentionOp``) and context parallelism (``parallel.context_parallel``)
plug in without touching the model.

An operator also owns *where tokens live*: ``shard_tokens``/``gather_tokens`` map the full token grid
``[B, T, H, W, ...]`` (patch units) to the part this process computes and back. The default keeps
everything local. A context-parallel operator gives each rank an H x W tile of every frame (padded when
the grid does not divide; whole 3D blocks for block-sparse ring attention), so the condition/noisy split
along T stays local on every rank.

Grids passed to ``self_attention`` are the *full* (T, H, W) token grids of the queries and keys; the
tokens are this process's part of them (all of them by default), in T-H-W raster order of that part. For
the noisy-queries call, the key grid starts ``kv_grid[0] - q_grid[0]`` frames earlier than the query grid
(the condition frames). ``clip_frames`` is the number of latent frames of the clip the model is running:
the ``latents`` passed to ``forward`` (with a condition cache, the noisy frames only; while encoding the
condition, the condition frames). Block-sparse attention decides dense-or-sparse from it alone
(:func:`uses_block_sparse`), as the published LongCat model does.
"""

from __future__ import annotations

import torch

from kernels.attention import dense_attention

Grid = tuple[int, int, int]


class AttentionOp:
    """Dense attention on one process (SDPA, or flash-attn on GPU when installed)."""

    name = "dense"

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, H, W, ...]`` (full grid) -> this process's part. Also used for RoPE tables (no batch:
        ``[T, H, W, ...]`` is passed with a leading batch of 1)."""
        return x

    def gather_tokens(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Inverse of ``shard_tokens`` with gradients flowing back to the local part; ``grid`` is the full
        (T, H, W) token grid."""
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_grid: Grid, kv_grid: Grid,
                       clip_frames: int | None = None) -> torch.Tensor:
        """Video self-attention: ``q [B, Sq, H, D]`` over ``k, v [B, Sk, H, D]`` (RoPE already applied);
        ``clip_frames`` as in the module docstring (None: ``kv_grid[0]``)."""
        return dense_attention(q, k, v)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor | None) -> torch.Tensor:
        """Text cross-attention; ``key_mask [B, L]`` is True on real (non-padding) text tokens."""
        return dense_attention(q, k, v, key_mask=key_mask)


def uses_block_sparse(clip_frames: int | None, kv_grid: Grid) -> bool:
    """The published model's rule: block-sparse attention unless the clip has a single latent frame
    (images). Decided from the clip alone, never from one call's query or key grid: with a condition cache
    and one noisy frame the attention is dense; without a cache, a one-frame condition inside a longer clip
    is block-sparse. ``clip_frames=None`` (direct callers): ``kv_grid[0]``."""
    return (kv_grid[0] if clip_frames is None else int(clip_frames)) > 1


class BlockSparseAttentionOp(AttentionOp):
    """3D block-sparse attention (SPEC section 5) on video tokens; dense when the clip has one frame.

    ``block_shape`` / ``kv_block_shape``: the query / key blocks (``chunk_3d_shape_q`` / ``_k``; keys default
    to the query shape); ``sparsity``, ``cdf_threshold``, ``fp32_scores``: the selection rule
    (``kernels/bsa/select.py``); ``backend``: ``kernels.bsa``'s."""

    name = "bsa"

    def __init__(self, sparsity: float | None = 0.9375, block_shape: Grid = (4, 4, 4),
                 cdf_threshold: float | None = None, backend: str = "auto", kv_block_shape: Grid | None = None,
                 fp32_scores: bool = False):
        self.sparsity = sparsity
        self.block_shape = tuple(block_shape)
        self.kv_block_shape = tuple(kv_block_shape) if kv_block_shape is not None else self.block_shape
        self.cdf_threshold = cdf_threshold
        self.backend = backend
        self.fp32_scores = fp32_scores

    def self_attention(self, q, k, v, q_grid, kv_grid, clip_frames=None):
        if not uses_block_sparse(clip_frames, kv_grid):
            return dense_attention(q, k, v)
        from kernels.bsa import block_sparse_attention

        return block_sparse_attention(q, k, v, latent_shape=q_grid, kv_latent_shape=kv_grid,
                                      block_shape=self.block_shape, kv_block_shape=self.kv_block_shape,
                                      sparsity=self.sparsity, cdf_threshold=self.cdf_threshold,
                                      backend=self.backend, fp32_scores=self.fp32_scores)
