"""Ring attention: each rank keeps its queries; key/value shards travel around the ring.

At ring step ``s`` rank ``r`` holds the K/V shard of rank ``(r - s) mod cp``, attends to it, and merges the
partial result into its running output by log-sum-exp (fp32). While it computes, the shard is already on
its way to rank ``r + 1`` (``RingShift``).

Backward (``_RingAttention``, written by hand, flash-attention style): the forward saves only its inputs,
the merged output and the merged lse. The backward walks the ring again, recomputes each step, adds that
step's dq locally, and adds dk/dv into fp32 accumulators that travel with the K/V shard; one last shift
returns each accumulator to the rank owning the shard. Memory: the inputs, the output and one fp32 lse per
query; per step, one visiting K/V shard in flight besides the current one (plus their fp32 dk/dv
accumulators in backward, whose transfer overlaps the next step's compute) and the step's own
temporaries, which both step kinds bound by chunking.

A *step* is the attention of the local queries over one visiting shard, returning ``(out, lse)`` with
``lse`` laid out like ``out`` without its last dim (``[..., heads]``, fp32, natural log):

* ``DenseStep``: forward by flash-attn when it is the backend (CUDA, fp16/bf16, installed), otherwise
  fp32 math in query chunks; backward by the explicit formula ``ds = p * (dp - delta)`` with the *merged*
  lse and ``delta = rowsum(dout * out)`` of the merged output, fp32 math in query chunks (no flash
  backward yet: on GPU this is the slow part of dense ring attention).
* ``BlockSparseStep``: ``kernels.bsa.block_attention`` over the selected key blocks this shard holds; its
  backward recomputes the step and backpropagates through ``block_attention`` with the gradients the lse
  merge gives that step (``w = exp(lse_s - lse)``: ``dout_s = w * dout``,
  ``dlse_s = w * (rowsum(dout * out_s) - delta)``).
"""

from __future__ import annotations

import math

import torch
from torch.distributed import ProcessGroup

from kernels.attention import dense_attention, flash_attn_available
from parallel.context_parallel.comm import RingShift, group_size, pack, unpack

# fp32 elements of one dense score chunk [B, H, rows, Sk]: 16 MiB per temporary on CPU, 512 MiB on GPU.
CHUNK_ELEMS = 1 << 22
CHUNK_ELEMS_CUDA = 1 << 27


def _row_chunks(rows: int, elems_per_row: int, device: torch.device):
    limit = CHUNK_ELEMS_CUDA if device.type == "cuda" else CHUNK_ELEMS
    step = max(1, limit // max(1, elems_per_row))
    for c0 in range(0, rows, step):
        yield c0, min(rows, c0 + step)


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, out_s: torch.Tensor, lse_s: torch.Tensor):
    """Merge a step's ``(out_s, lse_s)`` into the running fp32 ``(out, lse)``; rows with no keys (-inf) stay 0."""
    out_s = out_s.float()
    if out is None:
        return out_s, lse_s.float()
    new = torch.logaddexp(lse, lse_s)
    ref = _finite_or_zero(new)
    a, b = torch.exp(lse - ref), torch.exp(lse_s - ref)
    return out * a[..., None] + out_s * b[..., None], new


class DenseStep:
    """Dense attention of the local queries over a whole visiting shard. Layout ``[B, S, H, D]``."""

    def __init__(self, scale: float | None = None, backend: str = "auto"):
        self.scale, self.backend = scale, backend

    def forward(self, q, k, v, step: int):
        if self.backend == "flash" or (self.backend == "auto" and q.is_cuda and flash_attn_available()
                                       and q.dtype in (torch.float16, torch.bfloat16)):
            out, lse = dense_attention(q, k, v, scale=self.scale, return_lse=True, backend=self.backend)
            return out, lse.transpose(1, 2)
        # fp32 math in query chunks (math_attention would hold the whole [B, H, Sq, Sk] score matrix)
        B, Sq, H, D = q.shape
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(D)
        qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
        out = torch.empty(B, H, Sq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        for c0, c1 in _row_chunks(Sq, B * H * k.shape[1], q.device):
            s = torch.matmul(qh[:, :, c0:c1], kh.transpose(-1, -2)) * scale
            lse[:, :, c0:c1] = torch.logsumexp(s, dim=-1)
            out[:, :, c0:c1] = torch.matmul(torch.exp(s - lse[:, :, c0:c1, None]), vh)
        return out.transpose(1, 2), lse.transpose(1, 2)

    def backward(self, q, k, v, step: int, out, lse, dout, delta):
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(D)
        qh, kh, vh, doh = (t.transpose(1, 2).float() for t in (q, k, v, dout))  # [B, H, S, D]
        lse_h = _finite_or_zero(lse.transpose(1, 2))[..., None]
        delta_h = delta.transpose(1, 2)[..., None]
        dq = torch.empty_like(qh)
        dk, dv = torch.zeros_like(kh), torch.zeros_like(vh)
        for c0, c1 in _row_chunks(Sq, B * H * Sk, q.device):
            qc, doc = qh[:, :, c0:c1], doh[:, :, c0:c1]
            p = torch.exp(torch.matmul(qc, kh.transpose(-1, -2)) * scale - lse_h[:, :, c0:c1])
            dv += torch.matmul(p.transpose(-1, -2), doc)
            ds = p * (torch.matmul(doc, vh.transpose(-1, -2)) - delta_h[:, :, c0:c1])
            dq[:, :, c0:c1] = torch.matmul(ds, kh) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class BlockSparseStep:
    """Block attention of the local query blocks over the selected key blocks the visiting shard holds.

    Layout ``[B, nb, bs, H, D]``; ``steps[s]`` is ``(kv_index, kv_count)`` in the *visiting shard's* local
    block ids for ring step ``s``, or ``None`` when no query block selected any of its blocks.
    """

    def __init__(self, q_valid, k_valid, steps, scale: float | None = None, backend: str = "auto"):
        self.q_valid, self.k_valid, self.steps = q_valid, k_valid, steps
        self.scale, self.backend = scale, backend

    def _attend(self, qb, kb, vb, step):
        from kernels.bsa import block_attention

        kv_index, kv_count = self.steps[step]
        out, lse = block_attention(qb, kb, vb, self.q_valid, self.k_valid, kv_index, kv_count, scale=self.scale,
                                   backend=self.backend)
        return out, lse.permute(0, 2, 3, 1)

    def forward(self, qb, kb, vb, step: int):
        if self.steps[step] is None:
            return None
        return self._attend(qb, kb, vb, step)

    def backward(self, qb, kb, vb, step: int, out, lse, dout, delta):
        if self.steps[step] is None:
            return None
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in (qb, kb, vb))
            out_s, lse_s = self._attend(q, k, v, step)
            w = torch.exp(lse_s.detach() - _finite_or_zero(lse))
            d_out = (dout.float() * w[..., None]).to(out_s.dtype)
            d_lse = w * ((dout.float() * out_s.detach().float()).sum(-1) - delta)
            return torch.autograd.grad((out_s, lse_s), (q, k, v), (d_out, d_lse))


class RingRunner:
    """Drives one ring attention call: forward merge and hand-written backward over a ``step``."""

    def __init__(self, group: ProcessGroup, step):
        self.group, self.step = group, step
        self.cp = group_size(group)

    def forward(self, q, k, v):
        out = lse = None
        kv = pack([k, v])
        cur_k, cur_v = k, v
        for s in range(self.cp):
            shift = RingShift(kv, self.group, tag=0) if s < self.cp - 1 else None
            res = self.step.forward(q, cur_k, cur_v, s)
            if res is not None:
                out, lse = merge_partial(out, lse, *res)
            if shift is not None:
                kv = shift.wait()
                cur_k, cur_v = unpack(kv, [k, v])
        if out is None:  # no key anywhere (cannot happen for dense; BSA keeps >= 1 block per query block)
            out = q.new_zeros(q.shape, dtype=torch.float32)
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        return out.to(q.dtype), lse

    def backward(self, q, k, v, out, lse, dout):
        delta = (dout.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(2 * k.numel(), dtype=torch.float32, device=k.device)
        kv = pack([k, v])
        cur_k, cur_v = k, v
        pending = None  # the dk/dv accumulator of the shard arriving for this step, in flight
        for s in range(self.cp):
            shift = RingShift(kv, self.group, tag=0) if s < self.cp - 1 else None
            grads = self.step.backward(q, cur_k, cur_v, s, out, lse, dout, delta)
            if pending is not None:
                dkv = pending.wait()
            if grads is not None:
                gq, gk, gv = grads
                dq += gq
                dk, dv = unpack(dkv, [k, v])
                dk += gk
                dv += gv
            if self.cp > 1:  # the accumulator follows its K/V shard; the last shift brings it home
                pending = RingShift(dkv, self.group, tag=1)
            if shift is not None:
                kv = shift.wait()
                cur_k, cur_v = unpack(kv, [k, v])
        if pending is not None:
            dkv = pending.wait()
        dk, dv = unpack(dkv, [k, v])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, runner: RingRunner):
        out, lse = runner.forward(q, k, v)
        ctx.runner = runner
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.runner.backward(q, k, v, out, lse, dout.contiguous())
        return dq, dk, dv, None


def ring_attention(q, k, v, group: ProcessGroup, step) -> torch.Tensor:
    """Attention of local ``q`` over the K/V shards of every rank of ``group`` (see the module docstring)."""
    return _RingAttention.apply(q, k, v, RingRunner(group, step))


def dense_ring_attention(q, k, v, group: ProcessGroup, scale: float | None = None, backend: str = "auto"):
    """Dense ring attention: ``q [B, Sq, H, D]`` (local) over every rank's ``k, v [B, Sk, H, D]``."""
    return ring_attention(q, k, v, group, DenseStep(scale, backend))


@torch.no_grad()
def _plan_bsa_steps(qb, kb, q_valid, k_valid, kv_grid, block_shape, group, sparsity, cdf_threshold, scale):
    """Select key blocks exactly as single-process BSA would on the full grid, then split the selection
    by the rank holding each key block: ``steps[s]`` lists, in the visiting shard's local block ids, the
    blocks to attend at ring step ``s`` (the shard of rank ``(r - s) mod cp``)."""
    from kernels.bsa import num_blocks, pool_blocks, select_blocks

    from parallel.context_parallel.comm import all_gather_no_grad, group_rank

    cp, r = group_size(group), group_rank(group)
    B, H = qb.shape[0], qb.shape[3]
    nt, nh, nw = num_blocks(kv_grid, block_shape)  # local key blocks per axis; H is split across ranks
    q_pooled = pool_blocks(qb, q_valid)
    k_pooled = pool_blocks(kb, k_valid)  # [B, H, nk_local, D]
    D = k_pooled.shape[-1]
    k_all = all_gather_no_grad(k_pooled, group) if cp > 1 else k_pooled[None]
    # rank-major [cp, B, H, nt, nh, nw, D] -> global raster (tb, cp * nh, wb)
    k_all = k_all.view(cp, B, H, nt, nh, nw, D).permute(1, 2, 3, 0, 4, 5, 6).reshape(B, H, nt * cp * nh * nw, D)
    kv_index, kv_count = select_blocks(q_pooled, k_all, sparsity=sparsity, cdf_threshold=cdf_threshold, scale=scale)
    K = kv_index.shape[-1]
    used = torch.arange(K, device=kv_index.device) < kv_count[..., None].long()
    gid = torch.where(used, kv_index.long(), torch.zeros_like(kv_index, dtype=torch.long))
    wb = gid % nw
    hb = (gid // nw) % (cp * nh)
    tb = gid // (nw * cp * nh)
    owner = hb // nh
    local = (tb * nh + hb % nh) * nw + wb
    steps = []
    for s in range(cp):
        mine = used & (owner == (r - s) % cp)
        count = mine.sum(-1)
        kmax = int(count.max().item()) if count.numel() else 0
        if kmax == 0:
            steps.append(None)
            continue
        # stable sort puts this shard's blocks first, keeping their ascending order
        order = torch.sort((~mine).to(torch.uint8), dim=-1, stable=True).indices[..., :kmax]
        idx = local.gather(-1, order)
        idx = torch.where(torch.arange(kmax, device=idx.device) < count[..., None], idx, torch.full_like(idx, -1))
        steps.append((idx.to(torch.int32).contiguous(), count.to(torch.int32)))
    return steps


def bsa_ring_attention(q, k, v, q_grid, kv_grid, group: ProcessGroup, block_shape=(4, 4, 4),
                       sparsity: float = 0.9375, cdf_threshold: float | None = None, backend: str = "auto"):
    """Block-sparse ring attention on H-sharded grids.

    ``q [B, Sq, H, D]`` / ``k, v [B, Sk, H, D]`` are this rank's tokens in raster order of the *local*
    grids ``q_grid`` / ``kv_grid`` (rows ``[r*h, (r+1)*h)`` of every frame of the full grids, ``h`` a
    multiple of the block height, so local blocks are whole global blocks). Pooled keys are gathered from
    every rank, so the selection equals single-process ``block_sparse_attention`` on the full grids; each
    ring step attends to the selected blocks of the visiting shard and results merge by log-sum-exp.
    """
    from kernels.bsa import blockify, unblockify

    block_shape = tuple(int(b) for b in block_shape)
    for name, grid in (("q_grid", q_grid), ("kv_grid", kv_grid)):
        if grid[1] % block_shape[1] != 0:
            raise ValueError(f"BSA ring attention: local {name} {tuple(grid)} has height {grid[1]}, not a multiple "
                             f"of the block height {block_shape[1]}; each rank must hold whole 3D blocks "
                             f"(full height % (cp * block_h) == 0)")
    scale = 1.0 / math.sqrt(q.shape[-1])
    qb, q_valid = blockify(q, q_grid, block_shape)
    kb, k_valid = blockify(k, kv_grid, block_shape)
    vb, _ = blockify(v, kv_grid, block_shape)
    steps = _plan_bsa_steps(qb.detach(), kb.detach(), q_valid, k_valid, kv_grid, block_shape, group, sparsity,
                            cdf_threshold, scale)
    out_b = ring_attention(qb, kb, vb, group, BlockSparseStep(q_valid, k_valid, steps, scale, backend))
    return unblockify(out_b, q_grid, block_shape).to(q.dtype)
