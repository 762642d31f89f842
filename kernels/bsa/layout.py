"""3D block layout: T-H-W raster tokens <-> non-overlapping 3D blocks, validity masks, mean pooling.

A latent of shape ``(T, H, W)`` is padded up to multiples of ``block_shape = (bt, bh, bw)`` and cut into
``nb = ceil(T/bt) * ceil(H/bh) * ceil(W/bw)`` blocks of ``bs = bt*bh*bw`` tokens. Blocks are numbered in
(tb, hb, wb) raster order and tokens inside a block in (t, h, w) raster order. Padded tokens are zeros and
are marked invalid in ``valid [nb, bs]``. Every block holds at least one valid token (padding per axis is
smaller than the block).

``pad_to`` (a coarser block shape whose every axis is a multiple of ``block_shape``'s) pads the latent to
multiples of ``pad_to`` instead and cuts that into ``block_shape`` blocks: the fine blocks that tile the
coarse ones, used when query and key block shapes differ (``select.refine_selection``). Fine blocks may
then hold padding only.
"""

from __future__ import annotations

import math

import torch


def _check_shapes(latent_shape, block_shape):
    if len(latent_shape) != 3 or len(block_shape) != 3:
        raise ValueError(f"latent_shape and block_shape must be (T, H, W); got {latent_shape}, {block_shape}")
    if any(int(s) < 1 for s in latent_shape) or any(int(b) < 1 for b in block_shape):
        raise ValueError(f"latent_shape {latent_shape} and block_shape {block_shape} must be positive")
    return tuple(int(s) for s in latent_shape), tuple(int(b) for b in block_shape)


def _padded(latent_shape, block_shape, pad_to):
    """The padded latent: multiples of ``pad_to`` (default ``block_shape``), checked to tile by ``block_shape``."""
    pad_to = block_shape if pad_to is None else tuple(int(p) for p in pad_to)
    if len(pad_to) != 3 or any(p % b for p, b in zip(pad_to, block_shape)):
        raise ValueError(f"pad_to {pad_to} must be a multiple of block_shape {block_shape} on every axis")
    return tuple(-(-s // p) * p for s, p in zip(latent_shape, pad_to))


def num_blocks(latent_shape, block_shape, pad_to=None) -> tuple[int, int, int]:
    """Blocks per axis: ``(ceil(T/bt), ceil(H/bh), ceil(W/bw))`` (of the latent padded to ``pad_to``)."""
    latent_shape, block_shape = _check_shapes(latent_shape, block_shape)
    return tuple(p // b for p, b in zip(_padded(latent_shape, block_shape, pad_to), block_shape))


def block_valid_mask(latent_shape, block_shape, device=None, valid_shape=None, pad_to=None) -> torch.Tensor:
    """``[nb, bs]`` bool: True where the block slot holds a real (non-padded) token.

    ``valid_shape`` (default ``latent_shape``) marks only its leading ``(t, h, w)`` corner of the latent as
    real: context parallelism passes a rank's tile, whose trailing rows and columns may be padding too.
    Blocks may then hold no real token at all."""
    latent_shape, block_shape = _check_shapes(latent_shape, block_shape)
    limits = latent_shape if valid_shape is None else tuple(min(int(v), s) for v, s in zip(valid_shape, latent_shape))
    nt, nh, nw = num_blocks(latent_shape, block_shape, pad_to)
    bt, bh, bw = block_shape
    axes = []
    for n, b, s in zip((nt, nh, nw), block_shape, limits):
        axes.append((torch.arange(n * b, device=device) < s).view(n, b))
    vt, vh, vw = axes
    valid = vt[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
    return valid.reshape(nt * nh * nw, bt * bh * bw)


def blockify(x: torch.Tensor, latent_shape, block_shape, pad_to=None):
    """Reorder raster tokens into 3D blocks.

    ``x [B, S, *rest]`` with ``S = T*H*W`` in T-H-W raster order -> ``(xb [B, nb, bs, *rest], valid [nb, bs])``.
    Padded slots are zeros. ``rest`` is usually ``(heads, head_dim)``. ``pad_to``: see the module docstring.
    """
    latent_shape, block_shape = _check_shapes(latent_shape, block_shape)
    T, H, W = latent_shape
    bt, bh, bw = block_shape
    B, S = x.shape[:2]
    rest = tuple(x.shape[2:])
    if S != T * H * W:
        raise ValueError(f"sequence length {S} != prod(latent_shape {latent_shape}) = {T * H * W}")
    nt, nh, nw = num_blocks(latent_shape, block_shape, pad_to)
    xg = x.reshape(B, T, H, W, *rest)
    pt, ph, pw = nt * bt - T, nh * bh - H, nw * bw - W
    if pt or ph or pw:
        xg = _pad_thw(xg, nt * bt, nh * bh, nw * bw)
    xg = xg.reshape(B, nt, bt, nh, bh, nw, bw, *rest)
    nr = len(rest)
    perm = (0, 1, 3, 5, 2, 4, 6) + tuple(range(7, 7 + nr))
    xb = xg.permute(perm).reshape(B, nt * nh * nw, bt * bh * bw, *rest)
    return xb, block_valid_mask(latent_shape, block_shape, device=x.device, pad_to=pad_to)


def _pad_thw(xg: torch.Tensor, Tp: int, Hp: int, Wp: int) -> torch.Tensor:
    B, T, H, W = xg.shape[:4]
    out = xg.new_zeros(B, Tp, Hp, Wp, *xg.shape[4:])
    out[:, :T, :H, :W] = xg
    return out


def unblockify(xb: torch.Tensor, latent_shape, block_shape, pad_to=None) -> torch.Tensor:
    """Inverse of :func:`blockify`: ``xb [B, nb, bs, *rest]`` -> ``[B, S, *rest]``; padded slots are dropped."""
    latent_shape, block_shape = _check_shapes(latent_shape, block_shape)
    T, H, W = latent_shape
    bt, bh, bw = block_shape
    nt, nh, nw = num_blocks(latent_shape, block_shape, pad_to)
    B, nb, bs = xb.shape[:3]
    rest = tuple(xb.shape[3:])
    if nb != nt * nh * nw or bs != bt * bh * bw:
        raise ValueError(f"blocked tensor {tuple(xb.shape)} does not match latent {latent_shape} / block {block_shape}")
    nr = len(rest)
    xg = xb.reshape(B, nt, nh, nw, bt, bh, bw, *rest)
    perm = (0, 1, 4, 2, 5, 3, 6) + tuple(range(7, 7 + nr))
    xg = xg.permute(perm).reshape(B, nt * bt, nh * bh, nw * bw, *rest)
    xg = xg[:, :T, :H, :W]
    return xg.reshape(B, T * H * W, *rest)


def pool_blocks(xb: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over the valid tokens of each block: ``xb [B, nb, bs, H, D]`` -> ``[B, H, nb, D]``.

    Summed in fp32 and divided by the count of valid tokens, then rounded once to ``dtype`` (default
    ``xb``'s dtype, as the reference pools in the input dtype; pass ``torch.float32`` to keep fp32). Blocks
    with no valid token pool to 0."""
    w = valid.to(device=xb.device, dtype=torch.float32)
    n = w.sum(dim=1).clamp_min(1.0)
    with torch.autocast(xb.device.type, enabled=False):  # fp32 accumulation under autocast too
        pooled = torch.einsum("bnshd,ns->bhnd", xb.float(), w) / n[:, None]
    return pooled.to(xb.dtype if dtype is None else dtype)



def common_block(q_block, kv_block) -> tuple[int, int, int]:
    """The largest block shape tiling both ``q_block`` and ``kv_block`` (per-axis gcd): what attention runs
    on when query and key block shapes differ."""
    return tuple(math.gcd(int(a), int(b)) for a, b in zip(q_block, kv_block))
