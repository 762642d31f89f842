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
from parallel.context_parallel.comm import RingShift, group_rank, group_size, pack, unpack

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
    """Dense attention of the local queries over a whole visiting shard. Layout ``[B, S, H, D]``.

    With a padded layout (``tile = (th, tw)`` and ``valid[s] = (rows, cols)`` of real tokens in the tile
    visiting at step ``s``), the visiting keys are cut to their real rows and columns first, so padding is
    never attended; a shard with no real token is skipped. Padded queries attend like real ones (finite,
    dropped by the gather, zero gradient)."""

    def __init__(self, scale: float | None = None, backend: str = "auto", tile=None, valid=None):
        self.scale, self.backend = scale, backend
        self.tile, self.valid = tile, valid

    def _cut(self, step: int):
        """(rows, cols) to keep of the visiting tile, or None to keep it whole."""
        if self.valid is None or tuple(self.valid[step]) == tuple(self.tile):
            return None
        return self.valid[step]

    def _real_keys(self, t: torch.Tensor, cut) -> torch.Tensor:
        B, S, H, D = t.shape
        th, tw = self.tile
        return t.view(B, S // (th * tw), th, tw, H, D)[:, :, :cut[0], :cut[1]].reshape(B, -1, H, D)

    def _pad_keys(self, g: torch.Tensor, like: torch.Tensor, cut) -> torch.Tensor:
        B, S, H, D = like.shape
        th, tw = self.tile
        full = g.new_zeros(B, S // (th * tw), th, tw, H, D)
        full[:, :, :cut[0], :cut[1]] = g.view(B, S // (th * tw), cut[0], cut[1], H, D)
        return full.view(B, S, H, D)

    def forward(self, q, k, v, step: int):
        cut = self._cut(step)
        if cut is not None:
            if min(cut) == 0:
                return None
            k, v = self._real_keys(k, cut), self._real_keys(v, cut)
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
        cut = self._cut(step)
        if cut is not None:
            if min(cut) == 0:
                return None
            k_full = k
            k, v = self._real_keys(k, cut), self._real_keys(v, cut)
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
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        if cut is not None:
            dk, dv = self._pad_keys(dk, k_full, cut), self._pad_keys(dv, k_full, cut)
        return dq, dk, dv


class BlockSparseStep:
    """Block attention of the local query blocks over the selected key blocks the visiting shard holds.

    Layout ``[B, nb, bs, H, D]``; ``steps[s]`` is ``(kv_index, kv_count, k_valid)`` for ring step ``s``:
    block ids local to the *visiting shard*, and that shard's ``[nb, bs]`` validity mask (its padding); or
    ``None`` when no query block selected any of its blocks.
    """

    def __init__(self, q_valid, steps, scale: float | None = None, backend: str = "auto"):
        self.q_valid, self.steps = q_valid, steps
        self.scale, self.backend = scale, backend

    def _attend(self, qb, kb, vb, step):
        from kernels.bsa import block_attention

        kv_index, kv_count, k_valid = self.steps[step]
        out, lse = block_attention(qb, kb, vb, self.q_valid, k_valid, kv_index, kv_count, scale=self.scale,
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


def dense_ring_attention(q, k, v, group: ProcessGroup, scale: float | None = None, backend: str = "auto",
                         layout=None):
    """Dense ring attention: ``q [B, Sq, H, D]`` (local) over every rank's ``k, v [B, Sk, H, D]``.

    ``layout`` (a ``ShardLayout``): the tokens are tiles of it, whose padding is never attended; None: every
    token of every shard is real."""
    if layout is None:
        return ring_attention(q, k, v, group, DenseStep(scale, backend))
    valid = [layout.valid((group_rank(group) - s) % layout.cp) for s in range(layout.cp)]
    return ring_attention(q, k, v, group, DenseStep(scale, backend, layout.tile, valid))


def _tile_valid(frames: int, layout, rank: int, block_shape, device, pad_to=None) -> torch.Tensor:
    """``[nb, bs]`` validity of the blocks of ``rank``'s tile (``frames`` frames) of ``layout``."""
    from kernels.bsa import block_valid_mask

    th, tw = layout.tile
    return block_valid_mask((frames, th, tw), block_shape, device, valid_shape=(frames,) + layout.valid(rank),
                            pad_to=pad_to)


@torch.no_grad()
def _plan_bsa_steps(q_pooled, k_pooled, q_frames, kv_frames, layout, q_block, kv_block, fine, group, sparsity,
                    cdf_threshold, scale, fp32_scores):
    """Select key blocks exactly as single-process BSA would on the full grid, then split the selection
    by the rank holding each key block: ``steps[s]`` lists, in the visiting shard's local block ids, the
    blocks to attend at ring step ``s`` (the shard of rank ``(r - s) mod cp``), with its validity mask.

    ``q_pooled`` / ``k_pooled``: this tile's pooled ``q_block`` / ``kv_block`` blocks (the selection's own
    blocks). Attention runs on ``fine`` blocks (their common refinement; equal to both when they agree), so
    the lists are given in fine block ids."""
    from kernels.bsa import num_blocks, refine_selection, select_blocks

    from parallel.context_parallel.comm import all_gather_no_grad

    cp, r = group_size(group), group_rank(group)
    (ch, cw), (th, tw) = layout.split, layout.tile
    B, H = q_pooled.shape[:2]
    nt, nh, nw = num_blocks((kv_frames, th, tw), kv_block)  # key blocks of one tile
    _, gh, gw = num_blocks((kv_frames, layout.height, layout.width), kv_block)  # of the real full grid
    D = k_pooled.shape[-1]
    k_all = all_gather_no_grad(k_pooled.contiguous(), group) if cp > 1 else k_pooled[None]
    # rank-major [ch, cw, B, H, nt, nh, nw, D] -> the full grid's blocks (tb, hb, wb), padding-only blocks cut
    k_all = k_all.view(ch, cw, B, H, nt, nh, nw, D).permute(2, 3, 4, 0, 5, 1, 6, 7)
    k_all = k_all.reshape(B, H, nt, ch * nh, cw * nw, D)[:, :, :, :gh, :gw].reshape(B, H, nt * gh * gw, D)
    kv_index, kv_count = select_blocks(q_pooled, k_all, sparsity=sparsity, cdf_threshold=cdf_threshold, scale=scale,
                                       fp32_scores=fp32_scores)
    K = kv_index.shape[-1]
    used = torch.arange(K, device=kv_index.device) < kv_count[..., None].long()
    gid = torch.where(used, kv_index.long(), torch.zeros_like(kv_index, dtype=torch.long))
    wb = gid % gw
    hb = (gid // gw) % gh
    tb = gid // (gw * gh)
    owner = (hb // nh) * cw + wb // nw
    local = (tb * nh + hb % nh) * nw + wb % nw
    refine = fine != tuple(q_block) or fine != tuple(kv_block)
    steps = []
    for s in range(cp):
        src = (r - s) % cp
        mine = used & (owner == src)
        count = mine.sum(-1)
        kmax = int(count.max().item()) if count.numel() else 0
        if kmax == 0:
            steps.append(None)
            continue
        # stable sort puts this shard's blocks first, keeping their ascending order
        order = torch.sort((~mine).to(torch.uint8), dim=-1, stable=True).indices[..., :kmax]
        idx = local.gather(-1, order)
        idx = torch.where(torch.arange(kmax, device=idx.device) < count[..., None], idx, torch.full_like(idx, -1))
        if refine:
            idx, count = refine_selection(idx, count, num_blocks((q_frames, th, tw), q_block), (nt, nh, nw),
                                          [a // b for a, b in zip(q_block, fine)],
                                          [a // b for a, b in zip(kv_block, fine)])
        k_valid_src = _tile_valid(kv_frames, layout, src, fine, q_pooled.device, pad_to=kv_block)
        steps.append((idx.to(torch.int32).contiguous(), count.to(torch.int32), k_valid_src))
    return steps


def bsa_ring_attention(q, k, v, q_grid, kv_grid, group: ProcessGroup, layout, block_shape=(4, 4, 4),
                       sparsity: float | None = 0.9375, cdf_threshold: float | None = None, backend: str = "auto",
                       kv_block_shape=None, fp32_scores: bool = False):
    """Block-sparse ring attention on tiled grids.

    ``q_grid`` / ``kv_grid`` are the *full* (T, H, W) grids; ``q [B, Sq, H, D]`` / ``k, v [B, Sk, H, D]``
    are this rank's tile of every frame (``layout``, a ``ShardLayout`` whose tiles are whole 3D blocks of
    both ``block_shape`` and ``kv_block_shape``), in the tile's raster order. Pooled keys are gathered from
    every rank, so the selection (``kernels/bsa/select.py``: global top-k / CDF rule) equals single-process
    ``block_sparse_attention`` on the full grids; padding is neither pooled nor attended; each ring step
    attends to the selected blocks of the visiting shard and results merge by log-sum-exp.
    """
    from kernels.bsa import blockify, common_block, pool_blocks, unblockify

    q_block = tuple(int(b) for b in block_shape)
    kv_block = tuple(int(b) for b in kv_block_shape) if kv_block_shape is not None else q_block
    fine = common_block(q_block, kv_block)
    cp = group_size(group)
    if tuple(q_grid[1:]) != tuple(kv_grid[1:]):
        raise ValueError(f"BSA ring attention: q grid {tuple(q_grid)} and kv grid {tuple(kv_grid)} differ in H x W")
    th, tw = layout.tile
    if (layout.cp != cp or (layout.height, layout.width) != tuple(q_grid[1:])
            or any(th % b[1] or tw % b[2] for b in (q_block, kv_block))):
        raise ValueError(f"BSA ring attention: layout {layout} does not tile the grid {tuple(q_grid)} over cp={cp} "
                         f"in whole {q_block} / {kv_block} blocks")
    r = group_rank(group)
    q_tile, kv_tile = (q_grid[0], th, tw), (kv_grid[0], th, tw)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qb, _ = blockify(q, q_tile, fine, pad_to=q_block)
    kb, _ = blockify(k, kv_tile, fine, pad_to=kv_block)
    vb, _ = blockify(v, kv_tile, fine, pad_to=kv_block)
    q_valid = _tile_valid(q_grid[0], layout, r, fine, q.device, pad_to=q_block)
    k_valid = _tile_valid(kv_grid[0], layout, r, fine, k.device, pad_to=kv_block)
    pool_dtype = torch.float32 if fp32_scores else None
    with torch.no_grad():  # pool the selection's own blocks (the fine ones when they are the same)
        if fine == q_block:
            q_pooled = pool_blocks(qb.detach(), q_valid, pool_dtype)
        else:
            q_pooled = pool_blocks(blockify(q.detach(), q_tile, q_block)[0],
                                   _tile_valid(q_grid[0], layout, r, q_block, q.device), pool_dtype)
        if fine == kv_block:
            k_pooled = pool_blocks(kb.detach(), k_valid, pool_dtype)
        else:
            k_pooled = pool_blocks(blockify(k.detach(), kv_tile, kv_block)[0],
                                   _tile_valid(kv_grid[0], layout, r, kv_block, k.device), pool_dtype)
    steps = _plan_bsa_steps(q_pooled, k_pooled, q_grid[0], kv_grid[0], layout, q_block, kv_block, fine, group,
                            sparsity, cdf_threshold, scale, fp32_scores)
    out_b = ring_attention(qb, kb, vb, group, BlockSparseStep(q_valid, steps, scale, backend))
    return unblockify(out_b, q_tile, fine, pad_to=q_block).to(q.dtype)
