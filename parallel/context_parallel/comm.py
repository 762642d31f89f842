"""Communication for context parallelism: token-grid split/gather with gradients, ring shifts, all-to-all.

Gradient convention (read this before reducing gradients)
---------------------------------------------------------
Every backward here is the exact adjoint of its forward for the objective ``J = sum over cp ranks of
that rank's loss``. When each rank computes the same loss ``L`` on the gathered output (the DiT gathers
tokens before unpatchify and the loss is taken on the full latents), ``J = cp * L`` and so::

    mean over the cp group of a rank's parameter gradient == dL/dparam    (for every parameter)

That holds for parameters used on sharded tokens (blocks), on replicated inputs that reach sharded tokens
by broadcasting (timestep / caption embedders, adaLN), and before the split (patch embedding): the trainer
averages gradients over the cp ranks exactly as it does over data-parallel ranks (FSDP on the flattened
``dp x cp`` mesh does this). The loss value itself is identical on the cp ranks: log it once.

Hence ``gather_grid``'s backward is a sum over ranks followed by the local tile (the adjoint of an
all-gather), and ``split_grid``'s backward writes the local gradient into a zero tensor of the full shape
(the adjoint of taking a slice). The "backward of split = all-gather, backward of gather = local slice"
pairing is only consistent when every consumer of a replicated tensor is replicated too; the DiT's
per-frame modulation and text keys are replicated tensors consumed by sharded tokens, so that pairing
would leave some gradients partial and others complete, with no single reduction that fixes both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _check_divisible(x: torch.Tensor, dim: int, cp: int) -> None:
    if x.shape[dim] % cp != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} (shape {tuple(x.shape)}) into "
                         f"{cp} equal context-parallel shards: {x.shape[dim]} % {cp} != 0")


class _AllGatherStack(torch.autograd.Function):
    """``[cp, *x.shape]``: every rank's ``x`` in rank order. Backward: sum the gradient over ranks (the adjoint
    of the all-gather under the module's convention), then this rank's entry."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.r = group, group_rank(group)
        out = x.new_empty((group_size(group),) + tuple(x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.r], None


# -- split / gather of the token grid by a ShardLayout (H x W tiles, padded) ------------------------

def split_grid(x: torch.Tensor, layout, group: ProcessGroup | None) -> torch.Tensor:
    """``x [B, T, H, W, ...]`` (full grid) -> this rank's tile ``[B, T, th, tw, ...]`` of the zero-padded grid
    (``layout``: a ``ShardLayout``). Backward: the tile's gradient in place, zeros elsewhere."""
    B, T, H, W = x.shape[:4]
    if (H, W) != (layout.height, layout.width):
        raise ValueError(f"grid {H}x{W} does not match the layout's {layout.height}x{layout.width}")
    ph, pw = layout.padded
    if (ph, pw) != (H, W):
        padded = x.new_zeros((B, T, ph, pw) + tuple(x.shape[4:]))
        padded[:, :, :H, :W] = x
        x = padded
    (r0, c0), (th, tw) = layout.offset(group_rank(group)), layout.tile
    return x[:, :, r0:r0 + th, c0:c0 + tw]


def gather_grid(x: torch.Tensor, layout, group: ProcessGroup | None) -> torch.Tensor:
    """Inverse of ``split_grid``: every rank's tile ``[B, T, th, tw, ...]`` -> the full ``[B, T, H, W, ...]``,
    padding dropped. Backward: sum over ranks, then this rank's tile (the module's convention)."""
    (ch, cw), (th, tw) = layout.split, layout.tile
    if tuple(x.shape[2:4]) != (th, tw):
        raise ValueError(f"tile {tuple(x.shape[2:4])} does not match the layout's {th}x{tw}")
    B, T, rest = x.shape[0], x.shape[1], tuple(x.shape[4:])
    tiles = _AllGatherStack.apply(x, group) if group_size(group) > 1 else x[None]
    nr = len(rest)
    full = tiles.view(ch, cw, B, T, th, tw, *rest).permute(2, 3, 0, 4, 1, 5, *range(6, 6 + nr))
    full = full.reshape(B, T, ch * th, cw * tw, *rest)
    return full[:, :, :layout.height, :layout.width]


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``[cp, *x.shape]``: every rank's ``x`` stacked in rank order (no autograd)."""
    out = x.new_empty((group_size(group),) + tuple(x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


# -- ring shift -----------------------------------------------------------------------------------

class RingShift:
    """Send ``x`` to the next rank of the ring and receive the previous rank's buffer of the same shape.

    Both transfers are posted at construction (so compute can overlap them) and finished by ``wait()``.
    Posting is ordered by rank parity: even ranks post the send first, odd ranks the receive first. Every
    rank posts the same sequence of shifts, so send/receive pairs always match, on gloo as on NCCL;
    ``batch_isend_irecv`` is not used (it can hang on gloo). ``tag`` separates shifts in flight at once.
    """

    def __init__(self, x: torch.Tensor, group: ProcessGroup, tag: int = 0):
        cp, r = group_size(group), group_rank(group)
        self.send_buf = x.contiguous()
        self.recv_buf = torch.empty_like(self.send_buf)
        nxt, prv = (r + 1) % cp, (r - 1) % cp

        def send():
            return dist.isend(self.send_buf, group=group, tag=tag, group_dst=nxt)

        def recv():
            return dist.irecv(self.recv_buf, group=group, tag=tag, group_src=prv)

        self.works = [send(), recv()] if r % 2 == 0 else [recv(), send()]

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self.works = []
        return self.recv_buf


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Flatten same-dtype tensors into one contiguous buffer (one message instead of several)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, o = [], 0
    for t in like:
        n = t.numel()
        out.append(buf[o:o + n].view(t.shape))
        o += n
    return out


# -- all-to-all (Ulysses) -------------------------------------------------------------------------

def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup) -> torch.Tensor:
    cp = group_size(group)
    _check_divisible(x, scatter_dim, cp)
    inp = torch.stack(x.chunk(cp, dim=scatter_dim)).contiguous()
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup) -> torch.Tensor:
    """Split ``x`` into cp chunks along ``scatter_dim``, send chunk j to rank j, and concatenate the chunks
    received along ``gather_dim`` in rank order. Its backward is the inverse all-to-all."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
