"""PyTorch block attention over selected key blocks (the CPU backend, and the readable version of the math).

For each query block, gather the listed key/value blocks, do exact softmax attention over them (fp32 math),
and return the output and the natural-log log-sum-exp. Work is done in chunks of query blocks so memory
stays bounded (the gathered keys of one chunk, never all of them); backward recomputes the scores chunk
by chunk from the saved inputs, output and lse (flash-attention style), and accepts a gradient w.r.t. lse:

    ds = p * (dp - delta),   delta = rowsum(dout * out) - dlse

so ring attention may merge partial results by log-sum-exp and backpropagate through the merge.

Rows that attend to nothing (``kv_count == 0``, or padded query slots) give out = 0, lse = -inf, and zero
gradients.
"""

from __future__ import annotations

import math

import torch

# Elements of one fp32 score chunk [B, H, c, bs, K*bs]; 2**22 floats = 16 MiB per temporary.
CHUNK_ELEMS = 1 << 22


def _gather_chunk(kh, vh, kv_index, kv_count, k_valid, q_valid, c0, c1, nk):
    """The selected key/value blocks of query blocks c0:c1 in fp32, ``[B, H, c, K*bs, D]``, with
    :func:`_chunk_inputs`' indices and masks (forward and backward gather the same way)."""
    B, H = kv_index.shape[:2]
    K = kv_index.shape[-1]
    bs, D = kh.shape[-2:]
    flat, k_off, q_off = _chunk_inputs(kv_index, kv_count, k_valid, q_valid, c0, c1, nk, H)
    kg = kh.index_select(0, flat).view(B, H, c1 - c0, K * bs, D).float()
    vg = vh.index_select(0, flat).view(B, H, c1 - c0, K * bs, D).float()
    return flat, k_off, q_off, kg, vg


def _chunk_inputs(kv_index, kv_count, k_valid, q_valid, c0, c1, nk, H):
    """Flat gather indices [B*H*c*K] and the masked-out key/query slots for query blocks c0:c1.

    The masks are None when nothing in the chunk needs masking (the common case: no padding, all slots used).
    """
    B = kv_index.shape[0]
    K = kv_index.shape[-1]
    idx = kv_index[:, :, c0:c1].long()
    used = torch.arange(K, device=idx.device) < kv_count[:, :, c0:c1, None].long()
    idx = torch.where(used, idx, torch.zeros_like(idx))
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
    flat = (bh * nk + idx).reshape(-1)
    kval = k_valid[idx] & used[..., None]  # [B, H, c, K, bs]
    k_off = None if bool(kval.all()) else ~kval.reshape(B, H, c1 - c0, 1, -1)
    qval = q_valid[c0:c1]
    q_off = None if bool(qval.all()) else ~qval[None, None, :, :, None]  # [1, 1, c, bs, 1]
    return flat, k_off, q_off


def _scores(qs, kg, k_off, q_off):
    """fp32 scores of the scaled fp32 queries ``qs`` against gathered keys, masked slots = -inf."""
    s = torch.matmul(qs, kg.transpose(-1, -2))
    if k_off is not None:
        s.masked_fill_(k_off, float("-inf"))
    if q_off is not None:
        s.masked_fill_(q_off, float("-inf"))
    return s


def _heads_first(xb: torch.Tensor) -> torch.Tensor:
    """``[B, n, bs, H, D]`` -> contiguous ``[B*H*n, bs, D]``."""
    B, n, bs, H, D = xb.shape
    return xb.permute(0, 3, 1, 2, 4).reshape(B * H * n, bs, D)


class BlockAttentionTorch(torch.autograd.Function):
    # The math is fp32 by design: autocast (which would run the matmuls in bf16) is switched off inside.
    @staticmethod
    def forward(ctx, qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale, chunk):
        with torch.autocast(qb.device.type, enabled=False):
            return BlockAttentionTorch._forward(ctx, qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale, chunk)

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.autocast(dout.device.type, enabled=False):
            return BlockAttentionTorch._backward(ctx, dout, dlse)

    @staticmethod
    def _forward(ctx, qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale, chunk):
        B, nq, bs, H, D = qb.shape
        nk = kb.shape[1]
        qh = qb.permute(0, 3, 1, 2, 4).contiguous()  # [B, H, nq, bs, D]; contiguous keeps bmm on the fast path
        kh, vh = _heads_first(kb), _heads_first(vb)
        out = torch.zeros(B, H, nq, bs, D, dtype=qb.dtype, device=qb.device)
        lse = torch.full((B, H, nq, bs), float("-inf"), dtype=torch.float32, device=qb.device)
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            _, k_off, q_off, kg, vg = _gather_chunk(kh, vh, kv_index, kv_count, k_valid, q_valid, c0, c1, nk)
            # The scale is applied to the fp32 copy of q (never to low-precision K).
            p = _scores(qh[:, :, c0:c1].float() * scale, kg, k_off, q_off)
            m = p.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p.sub_(m).exp_()
            l = p.sum(dim=-1, keepdim=True)
            nonempty = l > 0
            o = torch.matmul(p, vg).div_(torch.where(nonempty, l, torch.ones_like(l)))
            out[:, :, c0:c1] = o.to(qb.dtype)
            lse[:, :, c0:c1] = torch.where(nonempty, m + torch.log(l), torch.full_like(l, float("-inf"))).squeeze(-1)
        ctx.save_for_backward(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out.permute(0, 2, 3, 1, 4), lse

    @staticmethod
    def _backward(ctx, dout, dlse):
        qb, kb, vb, q_valid, k_valid, kv_index, kv_count, out, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        B, nq, bs, H, D = qb.shape
        nk = kb.shape[1]
        K = kv_index.shape[-1]
        qh = qb.permute(0, 3, 1, 2, 4).contiguous()
        kh, vh = _heads_first(kb), _heads_first(vb)
        doh = dout.permute(0, 3, 1, 2, 4).contiguous()  # [B, H, nq, bs, D]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq = torch.zeros(B, H, nq, bs, D, dtype=torch.float32, device=qb.device)
        dk = torch.zeros(B * H * nk if need_kv else 0, bs, D, dtype=torch.float32, device=qb.device)
        dv = torch.zeros_like(dk)
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            c = c1 - c0
            flat, k_off, q_off, kg, vg = _gather_chunk(kh, vh, kv_index, kv_count, k_valid, q_valid, c0, c1, nk)
            qs = qh[:, :, c0:c1].float() * scale
            lse_c = lse[:, :, c0:c1, :, None]
            empty = ~torch.isfinite(lse_c)
            # p = exp(q.k - lse) with the subtraction fused into the matmul (baddbmm). Empty rows have
            # lse = -inf: use +inf there so that p = 0 instead of NaN.
            neg_lse = torch.where(empty, torch.full_like(lse_c, float("-inf")), -lse_c)
            kt = kg.reshape(-1, K * bs, D).transpose(1, 2)
            p = torch.baddbmm(neg_lse.reshape(-1, bs, 1), qs.reshape(-1, bs, D), kt).view(B, H, c, bs, K * bs)
            if k_off is not None:
                p.masked_fill_(k_off, float("-inf"))
            if q_off is not None:
                p.masked_fill_(q_off, float("-inf"))
            p.exp_()
            do = doh[:, :, c0:c1].float()
            delta = (do * out[:, :, c0:c1].float()).sum(dim=-1, keepdim=True)
            if dlse is not None:
                # lse = -inf (empty row) is constant: ignore its incoming gradient (may be NaN from a merge).
                dl = dlse[:, :, c0:c1, :, None].float()
                delta = delta - torch.where(empty, torch.zeros_like(dl), dl)
            # ds = p * (do.v - delta), the subtraction fused into the matmul.
            vt = vg.reshape(-1, K * bs, D).transpose(1, 2)
            ds = torch.baddbmm(-delta.reshape(-1, bs, 1), do.reshape(-1, bs, D), vt).view(B, H, c, bs, K * bs).mul_(p)
            dq[:, :, c0:c1] = torch.matmul(ds, kg).mul_(scale)
            if need_kv:
                dk.index_add_(0, flat, torch.matmul(ds.transpose(-1, -2), qs).reshape(-1, bs, D))
                dv.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), do).reshape(-1, bs, D))
        dq = dq.permute(0, 2, 3, 1, 4).to(qb.dtype)
        if not need_kv:
            return dq, None, None, None, None, None, None, None, None
        dk = dk.view(B, H, nk, bs, D).permute(0, 2, 3, 1, 4).to(kb.dtype)
        dv = dv.view(B, H, nk, bs, D).permute(0, 2, 3, 1, 4).to(vb.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def block_attention_torch(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale=None, chunk_elems=None):
    """PyTorch block attention; see :func:`kernels.bsa.block_attention` for the contract."""
    B, nq, bs, H, D = qb.shape
    K = max(1, kv_index.shape[-1])
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    chunk_elems = chunk_elems if chunk_elems is not None else CHUNK_ELEMS
    chunk = max(1, min(nq, chunk_elems // max(1, B * H * bs * K * bs)))
    return BlockAttentionTorch.apply(qb, kb, vb, q_valid.bool(), k_valid.bool(), kv_index, kv_count, scale, chunk)
