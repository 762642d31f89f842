"""Dense attention dispatch: one function, three backends (flash-attn, PyTorch SDPA, plain math).

Layout everywhere is ``[B, S, H, D]``. ``return_lse`` additionally returns the fp32 log-sum-exp of the
scaled scores, ``[B, H, S]`` in natural-log units, which ring attention needs to merge partial results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "flash", "sdpa", "math")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _pick(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None, return_lse: bool) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key_mask is None and flash_attn_available():
        return "flash"
    return "math" if return_lse else "sdpa"


def math_attention(q, k, v, key_mask=None, scale=None):
    """Reference attention in fp32 math; returns (out [B,S,H,D] in q's dtype, lse [B,H,S] fp32)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :].to(torch.bool), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)
    return out, lse


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Full (non-causal) attention of ``q [B,Sq,H,D]`` over ``k, v [B,Sk,H,D]``.

    ``key_mask [B, Sk]`` (True = attend) excludes padded keys; a query whose keys are all masked gets 0.
    """
    which = _pick(backend, q, key_mask, return_lse)
    if which == "flash":
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return (out, lse.float()) if return_lse else out
    if which == "math" or return_lse:
        out, lse = math_attention(q, k, v, key_mask, scale)
        return (out, lse) if return_lse else out
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale).transpose(1, 2)
    if key_mask is not None:
        # SDPA gives NaN for rows with no valid key; such a query attends to nothing.
        out = out.nan_to_num(0.0)
    return out
