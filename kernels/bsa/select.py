"""Key-block selection for block-sparse attention (not differentiable).

The rule is the one the published LongCat-Video kernel applies (its weights were fine-tuned and are
served with it), so that a model refined or fine-tuned here sees the attention pattern it was trained with:

* Block score = mean-pooled q block . mean-pooled k block (pooled after RoPE). Pooling accumulates in fp32
  and rounds once to the input dtype; the product is a matmul in that dtype (bf16 in the model), with
  autocast off. ``fp32_scores=True`` pools and scores in fp32 instead: an explicit option, not the default.
* top-k rule (``sparsity`` set): keep ``topk_count(sparsity, nk) = max(1, int((1 - sparsity) * nk))``
  key blocks per query block (Python float arithmetic, floor). The reference keeps 0 blocks (and outputs
  zeros) where that floor is 0; we keep 1.
* CDF rule (``cdf_threshold`` set): ``p = softmax(scores * scale)`` sorted descending and cumulated;
  keep the blocks whose running mass is ``<= cdf_threshold`` (``searchsorted(cdf, threshold, right=True)``,
  in the scores' dtype against an fp32 threshold), at least 1.
* Both set: the larger of the two counts. ``sparsity=None`` with a threshold is the CDF rule alone.

Ties are broken by ``torch.topk`` / ``torch.sort`` called as the reference calls them (same device and
dtype give the same choice).

Output: ``kv_index [B, H, nq, K] int32`` with the selected ids sorted ascending in the first
``kv_count`` slots and ``-1`` in the remaining slots, ``kv_count [B, H, nq] int32``.
"""

from __future__ import annotations

import math

import torch


def topk_count(sparsity: float, num_kv_blocks: int) -> int:
    """Key blocks the top-k rule keeps per query block: ``max(1, int((1 - sparsity) * num_kv_blocks))``."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return max(1, min(int((1.0 - float(sparsity)) * num_kv_blocks), num_kv_blocks))


def block_scores(q_pooled: torch.Tensor, k_pooled: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """``[B, H, nq, D] x [B, H, nk, D] -> [B, H, nq, nk]`` dot products of pooled blocks, in ``q_pooled``'s
    dtype (or fp32 when ``fp32``), autocast off."""
    dtype = torch.float32 if fp32 else q_pooled.dtype
    with torch.autocast(q_pooled.device.type, enabled=False):
        return torch.matmul(q_pooled.to(dtype), k_pooled.to(dtype).transpose(-1, -2))


def cdf_counts(scores: torch.Tensor, cdf_threshold: float, scale: float):
    """``(order, count)``: key blocks by descending softmax mass and how many the CDF rule keeps (may be 0)."""
    if not 0.0 < float(cdf_threshold) <= 1.0:
        raise ValueError(f"cdf_threshold must be in (0, 1], got {cdf_threshold}")
    with torch.autocast(scores.device.type, enabled=False):  # autocast would run softmax/cumsum in fp32
        probs = torch.softmax(scores * scale, dim=-1)
        ranked = torch.sort(probs, dim=-1, descending=True)
        cdf = torch.cumsum(ranked.values, dim=-1)
        threshold = torch.full(cdf.shape[:-1] + (1,), float(cdf_threshold), dtype=torch.float32, device=cdf.device)
        count = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return ranked.indices, count


def _first_ascending(order: torch.Tensor, count: torch.Tensor):
    """The first ``count`` ids of each row of ``order``, ascending, ``-1`` padded to the largest count."""
    nk = order.shape[-1]
    kmax = max(1, int(count.max().item()) if count.numel() else 1)
    ids = order[..., :kmax]
    ids = torch.where(torch.arange(kmax, device=ids.device) < count[..., None], ids, torch.full_like(ids, nk))
    ids = torch.sort(ids, dim=-1).values
    ids = torch.where(ids == nk, torch.full_like(ids, -1), ids)
    return ids.to(torch.int32).contiguous(), count.to(torch.int32)


@torch.no_grad()
def select_blocks(q_pooled: torch.Tensor, k_pooled: torch.Tensor, sparsity: float | None = 0.9375,
                  cdf_threshold: float | None = None, scale: float | None = None, fp32_scores: bool = False):
    """Select key blocks per query block (rule in the module docstring).

    Args:
        q_pooled: ``[B, H, nq, D]`` pooled query blocks (see :func:`kernels.bsa.pool_blocks`).
        k_pooled: ``[B, H, nk, D]`` pooled key blocks.
        sparsity: fraction of key blocks the top-k rule drops; None: no top-k rule (needs a threshold).
        cdf_threshold: softmax-mass threshold in ``(0, 1]`` of the CDF rule; None: no CDF rule.
        scale: softmax scale of the CDF rule; defaults to ``1/sqrt(D)``.
        fp32_scores: score in fp32 instead of ``q_pooled``'s dtype.

    Returns:
        ``(kv_index [B, H, nq, K] int32, kv_count [B, H, nq] int32)``; ids ascending, padding ``-1``.
    """
    if sparsity is None and cdf_threshold is None:
        raise ValueError("block selection needs sparsity, cdf_threshold, or both")
    scores = block_scores(q_pooled, k_pooled, fp32_scores)
    nk = scores.shape[-1]
    if cdf_threshold is None:
        k = topk_count(sparsity, nk)
        idx = torch.topk(scores, k, dim=-1).indices
        count = torch.full(scores.shape[:-1], k, dtype=torch.int32, device=scores.device)
        return torch.sort(idx, dim=-1).values.to(torch.int32).contiguous(), count
    scale = scale if scale is not None else 1.0 / math.sqrt(q_pooled.shape[-1])
    order, count = cdf_counts(scores, cdf_threshold, scale)
    floor = topk_count(sparsity, nk) if sparsity is not None else 1
    return _first_ascending(order, count.clamp(min=floor, max=nk))


def refine_selection(kv_index: torch.Tensor, kv_count: torch.Tensor, q_blocks, kv_blocks, q_ratio, kv_ratio):
    """Express a selection made on coarse blocks in finer blocks that tile them.

    When queries and keys use different block shapes (``chunk_3d_shape_q != chunk_3d_shape_k``), selection is
    made on those shapes and attention runs on their common refinement (per axis the gcd): query block
    shape ``q_ratio * fine`` and key block shape ``kv_ratio * fine``. ``q_blocks`` / ``kv_blocks`` are the
    coarse block grids ``(nt, nh, nw)``. Every fine query block inherits its coarse block's list; every
    selected coarse key block becomes its ``prod(kv_ratio)`` fine blocks (numbered in the fine grid's
    raster order). Returns ``(kv_index [B, H, nq_fine, K * prod(kv_ratio)], kv_count)``, ids distinct,
    ``-1`` padding; the attention is exactly the coarse one.
    """
    dev = kv_index.device
    qt, qh, qw = (torch.arange(n * r, device=dev) // r for n, r in zip(q_blocks, q_ratio))
    parent = ((qt[:, None, None] * q_blocks[1] + qh[None, :, None]) * q_blocks[2] + qw[None, None, :]).reshape(-1)
    kt, kh, kw = (torch.arange(n, device=dev)[:, None] * r + torch.arange(r, device=dev)
                  for n, r in zip(kv_blocks, kv_ratio))
    fh, fw = kv_blocks[1] * kv_ratio[1], kv_blocks[2] * kv_ratio[2]
    # children[c] = fine ids of coarse key block c: [nk, rt, rh, rw] over (tb, hb, wb) -> [nk, R]
    children = ((kt[:, None, None, :, None, None] * fh + kh[None, :, None, None, :, None]) * fw
                + kw[None, None, :, None, None, :]).reshape(math.prod(kv_blocks), -1)
    idx = kv_index[:, :, parent].long()
    fine = children[idx.clamp_min(0)]  # [B, H, nq_fine, K, R]
    fine = torch.where(idx[..., None] >= 0, fine, torch.full_like(fine, -1))
    R = children.shape[1]
    return fine.flatten(-2).to(torch.int32).contiguous(), (kv_count[:, :, parent] * R).to(torch.int32)


@torch.no_grad()
def local_selection(kv_index: torch.Tensor, kv_count: torch.Tensor, block_start: int, block_stop: int):
    """Restrict a global selection to the key blocks ``[block_start, block_stop)`` that one rank holds.

    For context parallelism: select globally (on all-gathered pooled keys), then each rank calls
    :func:`kernels.bsa.block_attention` on its own key blocks with the result of this function, and the
    partial ``(out, lse)`` of the ranks are merged by log-sum-exp.

    Returns ``(local_index [B, H, nq, K'] int32, local_count [B, H, nq] int32)``: ids relative to
    ``block_start``, ascending, ``-1`` padding; ``local_count`` may be 0. ``K' >= 1``.
    """
    K = kv_index.shape[-1]
    slot_used = torch.arange(K, device=kv_index.device) < kv_count[..., None].long()
    idx = kv_index.long()
    mine = slot_used & (idx >= block_start) & (idx < block_stop)
    big = torch.iinfo(torch.int64).max
    local = torch.where(mine, idx - block_start, torch.full_like(idx, big))
    local = torch.sort(local, dim=-1).values
    count = mine.sum(dim=-1)
    kmax = max(1, int(count.max().item()) if count.numel() else 1)
    local = local[..., :kmax]
    local = torch.where(local == big, torch.full_like(local, -1), local)
    return local.to(torch.int32).contiguous(), count.to(torch.int32)
