"""The LongCat-Video DiT (SPEC section 1) in one file.

Parameter names match the published checkpoint, so its safetensors load with no key mapping. The model
knows nothing about parallelism or sparsity: every attention runs through ``self.attention_op``
(``attention.py``), which decides where tokens live and how attention is computed.

Token layout inside the blocks: ``[B, T, S, C]`` with ``S = H * W`` patches of one latent frame, so
per-frame modulation is a broadcast over ``S``. Condition frames come first along ``T``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention_op import AttentionOp, Grid
from lcv_train.model.attention import build_attention_op
from lcv_train.model.config import DiTConfig, preset
from lcv_train.model.rope import apply_rope, rope_tables


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` (any shape, 0..1000 scale): cos first, then sin; fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
            return self.mlp(emb).float()


class CaptionEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.y_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: Grid, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B, T, h, w, D]
        return self.proj(x).permute(0, 2, 3, 4, 1)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32, with a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` with per-frame fp32 modulation; x ``[B, T, S, C]``, mods ``[B, T, 1, C]``."""
    xf = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)
    return (xf * (1 + scale) + shift).to(x.dtype)


@dataclass
class BlockCache:
    """Condition-frame keys (after QK-norm, before RoPE) and values of one block: ``[B, Sc, heads, hd]``."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class ConditionCache:
    """What ``LongCatDiT.encode_condition`` returns: per-block condition K/V, reused for every denoising
    step and both CFG branches (condition tokens depend on neither the noisy part nor the text)."""

    num_cond_latents: int
    grid: Grid  # full (unsharded) condition token grid
    blocks: list[BlockCache] = field(default_factory=list)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(dim // heads, eps)
        self.k_norm = RMSNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, num_cond: int, grid: Grid, op: AttentionOp, cache: BlockCache | None,
                cache_mode: str | None):
        """x ``[B, T, S, C]`` (local tokens); ``grid`` the full (T, H, W) token grid of ``x``'s frames;
        cos/sin ``[T(_full), S, hd/2]`` for the frames of ``x`` —
        when reading a cache, cos/sin cover condition frames first, then the frames of ``x``."""
        B, T, S, _ = x.shape
        # Head dim from the projection's width, so ``heads`` may be a per-rank count under tensor parallel.
        q, k, v = self.qkv(x).view(B, T * S, 3, self.heads, -1).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache_mode == "write":
            cache.k, cache.v = k, v
        if cache_mode == "read":
            Tc = cache.k.shape[1] // S
            q = apply_rope(q, cos[Tc:], sin[Tc:])
            k = torch.cat([apply_rope(cache.k, cos[:Tc], sin[:Tc]), apply_rope(k, cos[Tc:], sin[Tc:])], dim=1)
            v = torch.cat([cache.v, v], dim=1)
            out = op.self_attention(q, k, v, grid, (Tc + grid[0], grid[1], grid[2]), clip_frames=T)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if num_cond == 0 or num_cond == T:
                out = op.self_attention(q, k, v, grid, grid, clip_frames=T)
            else:
                n = num_cond * S
                cgrid, ngrid = (num_cond, grid[1], grid[2]), (T - num_cond, grid[1], grid[2])
                out_c = op.self_attention(q[:, :n], k[:, :n], v[:, :n], cgrid, cgrid, clip_frames=T)
                out_n = op.self_attention(q[:, n:], k, v, ngrid, grid, clip_frames=T)
                out = torch.cat([out_c, out_n], dim=1)
        return self.proj(out.reshape(B, T, S, -1))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=True)
        self.q_norm = RMSNorm(dim // heads, eps)
        self.k_norm = RMSNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, y, key_mask, op: AttentionOp):
        B, T, S, _ = x.shape
        q = self.q_norm(self.q_linear(x).view(B, T * S, self.heads, -1))
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.heads, -1).unbind(2)
        k = self.k_norm(k)
        return self.proj(op.cross_attention(q, k, v, key_mask).reshape(B, T, S, -1))


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LongCatBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_tembed_dim, 6 * dim, bias=True))
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.norm_eps)
        self.pre_crs_attn_norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.norm_eps)
        self.ffn = FeedForward(dim, cfg.ffn_hidden_size)

    def forward(self, x, temb, y, key_mask, cos, sin, num_cond: int, grid: Grid, op: AttentionOp,
                cache: BlockCache | None = None, cache_mode: str | None = None):
        """x ``[B, T, S, C]``; temb ``[B, T, A]`` fp32; y ``[B, L, C]`` embedded text (unused for cache writes);
        ``op`` is the model's attention operator."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            mods = self.adaLN_modulation(temb.to(self.adaLN_modulation[1].weight.dtype)).float()
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mods[:, :, None, :].chunk(6, dim=-1)

        h = self.attn(modulate(x, shift_a, scale_a), cos, sin, num_cond, grid, op, cache, cache_mode)
        x = x + (gate_a * h.float()).to(x.dtype)

        # Condition tokens skip cross-attention (their output is zero).
        if cache_mode != "write":
            c = 0 if cache_mode == "read" else num_cond
            xn = x[:, c:]
            out = self.cross_attn(self.pre_crs_attn_norm(xn), y, key_mask, op)
            x = torch.cat([x[:, :c], xn + out], dim=1) if c else x + out

        h = self.ffn(modulate(x, shift_f, scale_f))
        return x + (gate_f * h.float()).to(x.dtype)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_tembed_dim, 2 * dim, bias=True))
        self.linear = nn.Linear(dim, math.prod(cfg.patch_size) * cfg.out_channels, bias=True)

    def forward(self, x, temb):
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift, scale = self.adaLN_modulation(temb.to(self.linear.weight.dtype)).float()[:, :, None, :].chunk(2, -1)
            return self.linear(modulate(x.float(), shift, scale).to(self.linear.weight.dtype))


def init_rule(name: str, shape) -> tuple:
    """How parameter ``name`` (published name) starts: Xavier-uniform linears and patch embedding, N(0, 0.02)
    timestep MLP, AdaLN-Zero (modulations and the output projection at zero), zero biases, unit norms.
    LoRA adapters (``lcv_train.lora``): ``lora_up`` at zero (so an added adapter changes nothing) and
    ``lora_down`` Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Returns ``("zeros",)``, ``("ones",)``, ``("normal", std)`` or ``("uniform", bound)``."""
    if ".lora_up." in name:
        return ("zeros",)
    if ".lora_down." in name:
        return ("uniform", 1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".bias") or ".adaLN_modulation." in name or name.startswith("final_layer.linear."):
        return ("zeros",)
    if len(shape) == 1:
        return ("ones",)
    if name.startswith("t_embedder.mlp."):
        return ("normal", 0.02)
    fan_out, fan_in = shape[0], math.prod(shape[1:])  # a conv's kernel counts into fan_in (as a 2-D view)
    return ("uniform", math.sqrt(6.0 / (fan_in + fan_out)))


def initial_parameter(name: str, shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """The full initial value of parameter ``name``: drawn from a generator seeded by ``seed`` and the name
    alone, so it does not depend on the order, the process or the sharding in which parameters are made."""
    rule = init_rule(name, shape)
    if rule[0] in ("zeros", "ones"):
        return (torch.zeros if rule[0] == "zeros" else torch.ones)(shape, device=device, dtype=dtype)
    g = torch.Generator(device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(shape, device=device, dtype=torch.float32)
    if rule[0] == "normal":
        out.normal_(0.0, rule[1], generator=g)
    else:
        out.uniform_(-rule[1], rule[1], generator=g)
    return out.to(dtype)


class LongCatDiT(nn.Module):
    """``forward(latents, timestep, text, text_mask=None, num_cond_latents=0) -> velocity``.

    - ``latents`` ``[B, C, T, H, W]``, condition frames first (T2V: 0, I2V: 1, VC: k).
    - ``timestep`` ``[B]`` (condition frames get 0) or ``[B, T]`` per latent frame, on the 0..1000 scale.
    - ``text`` ``[B, L, caption_channels]``, ``text_mask`` ``[B, L]`` (True on real tokens).
    - returns the predicted velocity ``x0 - eps`` (the published sign), ``[B, C_out, T, H, W]``.
    """

    def __init__(self, cfg: DiTConfig, attention_op: AttentionOp | None = None, seed: int | None = None):
        super().__init__()
        self.config = cfg.validate()
        # Initial weights are a function of (init_seed, parameter name) only, so a model sharded before it is
        # initialised (built on meta) gets exactly the values this one does. Default: the first draw from
        # torch's RNG (before the submodules' own initialisers use it, which they do not on meta).
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu")) if seed is None else int(seed)
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, dim)
        self.t_embedder = TimestepEmbedder(cfg.frequency_embedding_size, cfg.adaln_tembed_dim)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, dim)
        self.blocks = nn.ModuleList([LongCatBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        # The one swappable attention operator (not a submodule: it holds no parameters).
        self.attention_op = attention_op or build_attention_op(cfg)
        self.reset_parameters()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LongCatDiT":
        return cls(preset(name, **overrides))

    @staticmethod
    def parallel_plan():
        """How ``parallel`` shards this model (``lcv_train/model/parallel_plan.py``)."""
        from lcv_train.model.parallel_plan import dit_parallel_plan

        return dit_parallel_plan()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter to ``initial_parameter(name, ...)`` (meta parameters are left alone)."""
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(initial_parameter(name, p.shape, self.init_seed, p.device, p.dtype))

    # -- shapes --------------------------------------------------------------------------------
    def token_grid(self, latent_shape) -> Grid:
        """(T, H, W) latent shape -> (T, h, w) patch grid; raises with the constraint when it does not fit."""
        T, H, W = latent_shape
        pt, ph, pw = self.config.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent shape (T={T}, H={H}, W={W}) does not fit model.patch_size="
                             f"{tuple(self.config.patch_size)}: each dim must be divisible by its patch")
        return (T // pt, H // ph, W // pw)

    def _patchify(self, latents: torch.Tensor):
        if latents.dim() != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(f"latents must be [B, {self.config.in_channels}, T, H, W], got {tuple(latents.shape)}")
        grid = self.token_grid(latents.shape[2:])
        x = self.x_embedder(latents)  # [B, T, h, w, C]
        return x, grid

    def _unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B = x.shape[0]
        T, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(B, T, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c, T * pt, h * ph, w * pw)

    def _frame_timesteps(self, timestep: torch.Tensor, B: int, T: int, num_cond: int) -> torch.Tensor:
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if timestep.dim() == 1:
            t = timestep[:, None].expand(B, T).clone()
            t[:, :num_cond] = 0
            return t
        if timestep.shape != (B, T):
            raise ValueError(f"timestep must be [B] or [B, T]=[{B}, {T}], got {tuple(timestep.shape)}")
        return timestep

    def _rope(self, grid: Grid, device, t_offset: int = 0):
        """RoPE tables for ``grid`` starting at frame ``t_offset``, sharded like the tokens: ``[T, S, hd/2]``."""
        cos, sin = rope_tables(grid, self.config.rope_split, self.config.rope_theta, device, t_offset)
        op = self.attention_op
        cos, sin = op.shard_tokens(cos[None])[0], op.shard_tokens(sin[None])[0]
        return cos.flatten(1, 2), sin.flatten(1, 2)

    def _embed_text(self, text, text_mask):
        y = self.y_embedder(text)
        if text_mask is not None:
            text_mask = text_mask.to(torch.bool)
            if self.config.text_tokens_zero_pad:
                y = y * text_mask[..., None].to(y.dtype)
        return y, text_mask

    # -- forward -------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, num_cond_latents: int = 0,
                cond_cache: ConditionCache | None = None) -> torch.Tensor:
        """Full forward; with ``cond_cache`` (from ``encode_condition``) ``latents`` holds only the noisy
        frames, the condition K/V come from the cache, and the output covers the noisy frames only."""
        op = self.attention_op
        B = latents.shape[0]
        x, grid = self._patchify(latents)
        T = grid[0]
        if cond_cache is not None:
            if num_cond_latents not in (0, cond_cache.num_cond_latents):
                raise ValueError("with cond_cache, pass only the noisy latents (num_cond_latents=0)")
            Tc = cond_cache.num_cond_latents
            if cond_cache.grid[1:] != grid[1:]:
                raise ValueError(f"cond_cache grid {cond_cache.grid} does not match latents grid {grid}")
            temb = self.t_embedder(self._frame_timesteps(timestep, B, T, 0))
            cos, sin = self._rope((Tc + T, grid[1], grid[2]), latents.device)
            caches, mode, num_cond = cond_cache.blocks, "read", 0
        else:
            num_cond = int(num_cond_latents)
            if not 0 <= num_cond < T:
                raise ValueError(f"num_cond_latents={num_cond} must be in [0, T={T}) (at least one noisy frame)")
            temb = self.t_embedder(self._frame_timesteps(timestep, B, T, num_cond))
            cos, sin = self._rope(grid, latents.device)
            caches, mode = [None] * len(self.blocks), None
        y, key_mask = self._embed_text(text, text_mask)

        x = op.shard_tokens(x)
        local = tuple(x.shape[1:4])
        x = x.flatten(2, 3)  # [B, T, S, C], S this process's tokens per frame
        for block, cache in zip(self.blocks, caches):
            x = block(x, temb, y, key_mask, cos, sin, num_cond, grid, op, cache, mode)
        x = self.final_layer(x, temb)
        x = op.gather_tokens(x.unflatten(2, local[1:]), grid)
        return self._unpatchify(x, grid)

    @torch.no_grad()
    def encode_condition(self, cond_latents: torch.Tensor) -> ConditionCache:
        """Run the condition frames alone (timestep 0, no text) and keep every block's K/V."""
        op = self.attention_op
        B = cond_latents.shape[0]
        x, grid = self._patchify(cond_latents)
        temb = self.t_embedder(torch.zeros(B, grid[0], device=cond_latents.device))
        cos, sin = self._rope(grid, cond_latents.device)
        x = op.shard_tokens(x).flatten(2, 3)
        cache = ConditionCache(num_cond_latents=grid[0], grid=grid, blocks=[BlockCache() for _ in self.blocks])
        for block, bc in zip(self.blocks, cache.blocks):
            x = block(x, temb, None, None, cos, sin, grid[0], grid, op, bc, "write")
        return cache

    # -- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
