"""3D rotary position embedding (SPEC section 1): theta 10000 on every axis, head_dim split (t, h, w),
interleaved channel pairs, integer positions, cos/sin tables in fp32."""

from __future__ import annotations

import torch


def _axis_freqs(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def rope_tables(grid: tuple[int, int, int], split: tuple[int, int, int], theta: float = 10000.0,
                device=None, t_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``[T, H, W, head_dim / 2]`` (fp32) for integer positions; frame positions
    start at ``t_offset``. Channel pairs are ordered [t pairs, h pairs, w pairs]."""
    T, H, W = grid
    angles = []
    for n, dim, offset, axis in ((T, split[0], t_offset, 0), (H, split[1], 0, 1), (W, split[2], 0, 2)):
        pos = torch.arange(offset, offset + n, dtype=torch.float64, device=device)
        a = pos[:, None] * _axis_freqs(dim, theta, device)[None]  # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(T, H, W, dim // 2))
    ang = torch.cat(angles, dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [B, S, heads, hd]`` by tables ``[..., hd/2]``
    that flatten to ``[S, hd/2]``; computed in fp32, returned in x's dtype."""
    B, S, Hh, D = x.shape
    cos = cos.reshape(1, S, 1, D // 2)
    sin = sin.reshape(1, S, 1, D // 2)
    xf = x.float().view(B, S, Hh, D // 2, 2)
    x0, x1 = xf.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
