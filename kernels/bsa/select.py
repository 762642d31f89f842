"""Key-block selection for block-sparse attention (not differentiable).

Block score = mean-pooled q block . mean-pooled k block (pooled after RoPE, fp32).

* top-k rule: keep ``k = topk_count(sparsity, nk)`` key blocks per query block, where
  ``k = clamp(ceil((1 - sparsity) * nk), 1, nk)`` (ceil, with a 1e-6 slack against float noise so that
  0.0625 * 16 gives exactly 1). Ceil means the kept fraction is never below ``1 - sparsity`` and the
  count is never 0 (the ``int((1 - s) * n)`` trap).
* CDF rule (``cdf_threshold`` set): keep the smallest set of highest-scoring key blocks whose
  ``softmax(scores * scale)`` mass reaches the threshold; at least 1 block.

Output: ``kv_index [B, H, nq, K] int32`` with the selected ids sorted ascending in the first
``kv_count`` slots and ``-1`` in the remaining slots, ``kv_count [B, H, nq] int32``.
"""

from __future__ import annotations

import math

import torch


def topk_count(sparsity: float, num_kv_blocks: int) -> int:
    """Number of key blocks kept per query block for a given sparsity (see module docstring)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    k = math.ceil((1.0 - float(sparsity)) * num_kv_blocks - 1e-6)
    return int(min(max(k, 1), num_kv_blocks))


def block_scores(q_pooled: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
    """``[B, H, nq, D] x [B, H, nk, D] -> [B, H, nq, nk]`` fp32 dot products of pooled blocks."""
    with torch.autocast(q_pooled.device.type, enabled=False):  # fp32 even under autocast
        return torch.matmul(q_pooled.float(), k_pooled.float().transpose(-1, -2))


@torch.no_grad()
def select_blocks(q_pooled: torch.Tensor, k_pooled: torch.Tensor, sparsity: float = 0.9375,
                  cdf_threshold: float | None = None, scale: float | None = None):
    """Select key blocks per query block.

    Args:
        q_pooled: ``[B, H, nq, D]`` pooled query blocks (see :func:`kernels.bsa.pool_blocks`).
        k_pooled: ``[B, H, nk, D]`` pooled key blocks.
        sparsity: fraction of key blocks dropped by the top-k rule (ignored when ``cdf_threshold`` is set).
        cdf_threshold: if set, use the CDF rule with this softmax-mass threshold in ``(0, 1]``.
        scale: softmax scale for the CDF rule; defaults to ``1/sqrt(D)``.

    Returns:
        ``(kv_index [B, H, nq, K] int32, kv_count [B, H, nq] int32)``; ids ascending, padding ``-1``.
    """
    scores = block_scores(q_pooled, k_pooled)
    nk = scores.shape[-1]
    if cdf_threshold is None:
        k = topk_count(sparsity, nk)
        idx = torch.topk(scores, k, dim=-1, sorted=False).indices
        idx = torch.sort(idx, dim=-1).values.to(torch.int32)
        count = torch.full(scores.shape[:-1], k, dtype=torch.int32, device=scores.device)
        return idx.contiguous(), count
    if not 0.0 < float(cdf_threshold) <= 1.0:
        raise ValueError(f"cdf_threshold must be in (0, 1], got {cdf_threshold}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q_pooled.shape[-1])
    probs = torch.softmax(scores * scale, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    csum = torch.cumsum(sorted_p, dim=-1)
    mass_before = torch.cat([torch.zeros_like(csum[..., :1]), csum[..., :-1]], dim=-1)  # monotone by construction
    # A block is kept while the mass of the blocks ranked above it is still below the threshold.
    keep = mass_before < float(cdf_threshold)
    keep[..., 0] = True
    count = keep.sum(dim=-1)
    kmax = int(count.max().item())
    ids = torch.where(keep, order, torch.full_like(order, nk))[..., :kmax]
    ids = torch.sort(ids, dim=-1).values
    ids = torch.where(ids == nk, torch.full_like(ids, -1), ids)
    return ids.to(torch.int32).contiguous(), count.to(torch.int32)


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
