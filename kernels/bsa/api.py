"""Public entry points of 3D block-sparse attention (BSA).

``block_sparse_attention`` = blockify -> pool -> select (no grad) -> block_attention -> unblockify.
Selection follows the published LongCat kernel (``select.py``); query and key blocks may differ in shape.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from .layout import blockify, common_block, num_blocks, pool_blocks, unblockify
from .naive import block_attention_torch
from .select import refine_selection, select_blocks

_BACKENDS = ("auto", "torch", "triton")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"BSA backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and importlib.util.find_spec("triton") is not None else "torch"
    return backend


def block_attention(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, q_valid: torch.Tensor,
                    k_valid: torch.Tensor, kv_index: torch.Tensor, kv_count: torch.Tensor,
                    scale: float | None = None, backend: str = "auto"):
    """Exact attention of each query block over its listed key blocks only.

    Args:
        qb: ``[B, nq, bs, H, D]`` blocked queries (from :func:`blockify`).
        kb, vb: ``[B, nk, bs, H, D]`` blocked keys / values.
        q_valid: ``[nq, bs]`` bool, False on padded query slots.
        k_valid: ``[nk, bs]`` bool, False on padded key slots (never attended).
        kv_index: ``[B, H, nq, K]`` int key-block ids; only the first ``kv_count`` entries of each row are
            read and they must be distinct. ``K`` may be 0.
        kv_count: ``[B, H, nq]`` int, may be 0 (a query block with nothing to attend to here).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (triton on CUDA tensors when triton is installed,
            torch otherwise).

    Returns:
        ``(out_b [B, nq, bs, H, D] in q's dtype, lse_b [B, H, nq, bs] fp32)``, lse the natural-log
        log-sum-exp of the scaled scores. Rows attending to nothing (``kv_count == 0`` or padded query
        slots) give out = 0 and lse = -inf.

    Differentiable in ``qb``, ``kb``, ``vb`` through both outputs: backward accepts a gradient w.r.t.
    ``lse_b`` (needed when partial results are merged by log-sum-exp, as ring attention does). Empty
    rows get zero gradients, never NaN.
    """
    if qb.dim() != 5 or kb.shape != vb.shape or kb.shape[0] != qb.shape[0] or kb.shape[2:] != qb.shape[2:]:
        raise ValueError(f"bad block shapes q {tuple(qb.shape)} k {tuple(kb.shape)} v {tuple(vb.shape)}")
    B, nq, bs, H, D = qb.shape
    if tuple(kv_index.shape[:3]) != (B, H, nq) or tuple(kv_count.shape) != (B, H, nq):
        raise ValueError(f"kv_index {tuple(kv_index.shape)} / kv_count {tuple(kv_count.shape)} "
                         f"do not match [B, H, nq] = {(B, H, nq)}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    # Mixed dtypes happen under autocast (e.g. fp32 QK-norm outputs next to a bf16 v): compute in q's dtype.
    kb = kb if kb.dtype == qb.dtype else kb.to(qb.dtype)
    vb = vb if vb.dtype == qb.dtype else vb.to(qb.dtype)
    if kv_index.shape[-1] == 0:
        kv_index = torch.full((B, H, nq, 1), -1, dtype=torch.int32, device=qb.device)
        kv_count = torch.zeros_like(kv_count)
    q_valid = q_valid.to(device=qb.device, dtype=torch.bool)
    k_valid = k_valid.to(device=qb.device, dtype=torch.bool)
    kv_index = kv_index.to(device=qb.device, dtype=torch.int32)
    kv_count = kv_count.to(device=qb.device, dtype=torch.int32)
    if _resolve_backend(backend, qb) == "triton":
        from .triton_fwd_bwd import block_attention_triton  # lazy: keeps triton out of `import kernels`

        return block_attention_triton(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale)
    return block_attention_torch(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, latent_shape,
                           kv_latent_shape=None, block_shape=(4, 4, 4), sparsity: float | None = 0.9375,
                           cdf_threshold: float | None = None, backend: str = "auto", return_lse: bool = False,
                           kv_block_shape=None, fp32_scores: bool = False):
    """3D block-sparse attention with LongCat's block selection.

    Args:
        q: ``[B, Sq, H, D]`` in T-H-W raster order of ``latent_shape = (T, H, W)`` (RoPE already applied).
        k, v: ``[B, Sk, H, D]`` in raster order of ``kv_latent_shape`` (default ``latent_shape``; with
            condition frames kv has more frames than q).
        block_shape: 3D query block ``(bt, bh, bw)`` (``chunk_3d_shape_q``). Latent sizes need not be
            multiples (exact padding masks; the reference refuses such sizes).
        kv_block_shape: 3D key block (``chunk_3d_shape_k``), default ``block_shape``.
        sparsity: top-k rule, keeps ``max(1, int((1 - sparsity) * nk))`` key blocks per query block; None
            for the CDF rule alone.
        cdf_threshold: if set, the CDF rule: keep the top blocks whose cumulated softmax block-score mass
            stays ``<=`` the threshold (at least 1); with ``sparsity`` too, the larger of the two counts.
        backend: ``"torch"``, ``"triton"``, ``"auto"`` (triton when ``q.is_cuda``).
        return_lse: also return ``lse [B, H, Sq]`` fp32, natural log.
        fp32_scores: pool and score in fp32 instead of q's dtype (off: the reference scores in bf16).

    Block scores are mean-pooled q block . mean-pooled k block over valid tokens (``select.py``); selection
    is not differentiable. Softmax scale is ``1/sqrt(D)``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B,Sq,H,D], k/v [B,Sk,H,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    latent_shape = tuple(latent_shape)
    kv_latent_shape = tuple(kv_latent_shape) if kv_latent_shape is not None else latent_shape
    q_block = tuple(int(b) for b in block_shape)
    kv_block = tuple(int(b) for b in kv_block_shape) if kv_block_shape is not None else q_block
    fine = common_block(q_block, kv_block)  # == both when the shapes agree (the published setting)
    qb, q_valid = blockify(q, latent_shape, fine, pad_to=q_block)
    kb, k_valid = blockify(k, kv_latent_shape, fine, pad_to=kv_block)
    vb, _ = blockify(v, kv_latent_shape, fine, pad_to=kv_block)
    scale = 1.0 / math.sqrt(q.shape[-1])
    pool_dtype = torch.float32 if fp32_scores else None
    with torch.no_grad():
        if fine == q_block:
            q_pooled = pool_blocks(qb.detach(), q_valid, pool_dtype)
        else:
            q_pooled = pool_blocks(*blockify(q.detach(), latent_shape, q_block), pool_dtype)
        if fine == kv_block:
            k_pooled = pool_blocks(kb.detach(), k_valid, pool_dtype)
        else:
            k_pooled = pool_blocks(*blockify(k.detach(), kv_latent_shape, kv_block), pool_dtype)
        kv_index, kv_count = select_blocks(q_pooled, k_pooled, sparsity=sparsity, cdf_threshold=cdf_threshold,
                                           scale=scale, fp32_scores=fp32_scores)
        if fine != q_block or fine != kv_block:
            kv_index, kv_count = refine_selection(
                kv_index, kv_count, num_blocks(latent_shape, q_block), num_blocks(kv_latent_shape, kv_block),
                [a // b for a, b in zip(q_block, fine)], [a // b for a, b in zip(kv_block, fine)])
    out_b, lse_b = block_attention(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale=scale, backend=backend)
    out = unblockify(out_b, latent_shape, fine, pad_to=q_block).to(q.dtype)
    if not return_lse:
        return out
    lse = unblockify(lse_b.permute(0, 2, 3, 1), latent_shape, fine, pad_to=q_block).permute(0, 2, 1).contiguous()
    return out, lse
