"""LoRA adapters on the DiT's linears, keeping every base parameter's published name.

An adapted ``nn.Linear`` becomes a ``LoRALinear`` in place (same object, same ``weight``/``bias``), with two
new submodules, so its tensors are named like the published LoRA files name theirs:

    blocks.0.attn.qkv.weight / .bias          the base, unchanged (published loading, sharding, export)
    blocks.0.attn.qkv.lora_down.weight        [n*r, in]
    blocks.0.attn.qkv.lora_up.blocks.i.weight [out/n, r]  (fused layers: qkv n=3, kv_linear n=2)
    blocks.0.ffn.w1.lora_up.weight            [out, r]    (every other layer, n=1)

    out = base(x) + multiplier * alpha_scale * up(down(x)),   alpha_scale = alpha / rank   (SPEC section 9)

where a fused layer's up projection maps the i-th rank-r slice of ``down(x)`` to the i-th output slice
(a block-diagonal up matrix). Initial values come from ``initial_parameter`` (the seed and the name only,
like every DiT parameter): ``lora_up`` zero, ``lora_down`` Kaiming-uniform, so a model built on meta and
filled shard by shard gets the values one process does. ``alpha_scale`` and the multiplier are plain
attributes, not tensors: they come from the config (or the published file) and never train.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcv_train.errors import ConfigError, require

# Layers whose output is n projections side by side; their LoRA gets one up block per projection.
FUSED_PARTS = {"attn.qkv": 3, "cross_attn.kv_linear": 2}


def default_targets() -> list[str]:
    """The attention and FFN linears of every block (not the embedders, modulations or final layer)."""
    return ["blocks.*.attn.*", "blocks.*.cross_attn.*", "blocks.*.ffn.*"]


@dataclass
class LoRAConfig:
    """``rank``/``alpha`` as the published files (128/64); ``targets`` are fnmatch patterns over module names,
    of which only ``nn.Linear`` modules are adapted; ``multiplier`` scales the adapter's output."""

    rank: int = 128
    alpha: float = 64.0
    targets: list[str] = field(default_factory=default_targets)
    multiplier: float = 1.0

    def validate(self, prefix: str = "lora") -> "LoRAConfig":
        require(isinstance(self.rank, int) and self.rank > 0, f"{prefix}.rank",
                f"must be a positive int, got {self.rank!r}")
        require(self.alpha > 0, f"{prefix}.alpha", f"must be > 0, got {self.alpha!r}")
        require(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets), f"{prefix}.targets",
                f"must be a non-empty list of module-name patterns, got {self.targets!r}")
        return self

    @property
    def alpha_scale(self) -> float:
        return self.alpha / self.rank


def is_lora_name(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a LoRA adapter (not to the base model)."""
    return ".lora_down." in name or ".lora_up." in name


class LoRAUp(nn.Module):
    """A fused layer's up projection: ``blocks[i]`` maps the i-th rank slice to the i-th output slice."""

    def __init__(self, blocks: list[nn.Linear]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(c) for b, c in zip(self.blocks, h.chunk(len(self.blocks), dim=-1))], dim=-1)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a LoRA term; made from an existing one by ``attach_lora`` (never constructed)."""

    lora_down: nn.Linear
    lora_up: nn.Module
    lora_rank: int
    lora_parts: int
    lora_alpha_scale: float
    lora_multiplier: float
    lora_merged_scale: float | None  # the scale folded into ``weight`` by ``merge``, None when unmerged

    @property
    def lora_scale(self) -> float:
        return self.lora_multiplier * self.lora_alpha_scale

    def up_weights(self) -> list[torch.Tensor]:
        return [b.weight for b in self.lora_up.blocks] if self.lora_parts > 1 else [self.lora_up.weight]

    def delta_weight(self) -> torch.Tensor:
        """``up @ down`` as one ``[out, in]`` fp32 matrix (unscaled): block i of the rows is ``up_i @ down_i``."""
        downs = self.lora_down.weight.float().chunk(self.lora_parts, dim=0)
        return torch.cat([u.float() @ d for u, d in zip(self.up_weights(), downs)], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_merged_scale is not None or self.lora_scale == 0:
            return out
        h = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (h * self.lora_scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * up @ down`` into ``weight`` (the LoRA term is then skipped in ``forward``)."""
        if self.lora_merged_scale is None:
            self.weight.copy_((self.weight.float() + self.lora_scale * self.delta_weight()).to(self.weight.dtype))
            self.lora_merged_scale = self.lora_scale

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take back exactly what ``merge`` added (up to the base dtype's rounding)."""
        if self.lora_merged_scale is not None:
            w = self.weight.float() - self.lora_merged_scale * self.delta_weight()
            self.weight.copy_(w.to(self.weight.dtype))
            self.lora_merged_scale = None


def fused_parts(module_name: str) -> int:
    """How many projections a layer fuses (``FUSED_PARTS``; 1 for every other layer)."""
    return next((n for suffix, n in FUSED_PARTS.items() if module_name == suffix or module_name.endswith("." + suffix)),
                1)


def attach_lora(linear: nn.Linear, rank: int, parts: int = 1, alpha_scale: float = 0.5,
                multiplier: float = 1.0) -> LoRALinear:
    """Turn ``linear`` into a ``LoRALinear`` in place (its parameters stay the same objects) with empty
    adapters on its device and dtype; the caller fills them (``initial_parameter`` or a file)."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"LoRA targets a plain nn.Linear, got {type(linear).__name__}")
    if linear.out_features % parts:
        raise ValueError(f"out_features={linear.out_features} is not divisible into {parts} fused parts")
    kw = dict(bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
    linear.__class__ = LoRALinear
    linear.lora_down = nn.Linear(linear.in_features, parts * rank, **kw)
    linear.lora_up = (LoRAUp([nn.Linear(rank, linear.out_features // parts, **kw) for _ in range(parts)]) if parts > 1
                      else nn.Linear(rank, linear.out_features, **kw))
    linear.lora_rank, linear.lora_parts = rank, parts
    linear.lora_alpha_scale, linear.lora_multiplier = float(alpha_scale), float(multiplier)
    linear.lora_merged_scale = None
    return linear


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted linear by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the plain ``nn.Linear`` modules that match any pattern; each pattern must match one."""
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            raise ConfigError(f"lora.targets: pattern {pattern!r} matches no nn.Linear of the model "
                              f"(names look like {linears[len(linears) // 2]!r})")
    return [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in targets)]


@torch.no_grad()
def add_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None, freeze_base: bool = True) -> list[str]:
    """Add adapters to the linears ``cfg.targets`` names, initialised from (``seed``, parameter name) —
    ``seed`` defaults to the model's ``init_seed`` — and (by default) freeze everything else. Works on a
    model on the meta device (the adapters stay empty until filled, like the base). Before parallelisation.
    Returns the adapted module names."""
    from lcv_train.model.dit import initial_parameter

    cfg.validate()
    if lora_modules(model):
        raise ConfigError("lora: the model already has LoRA adapters; add them once")
    seed = getattr(model, "init_seed", 0) if seed is None else seed
    names = target_linears(model, cfg.targets)
    for name in names:
        attach_lora(model.get_submodule(name), cfg.rank, fused_parts(name), cfg.alpha_scale, cfg.multiplier)
    if freeze_base:
        model.requires_grad_(False)
    for name, p in model.named_parameters():
        if is_lora_name(name):
            p.requires_grad_(True)
            if not p.is_meta:
                p.copy_(initial_parameter(name, p.shape, seed, p.device, p.dtype))
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their model names (``...qkv.lora_down.weight``)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_name(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors (published names), without the adapters. Merge first to fold them in."""
    return {k: v for k, v in model.state_dict().items() if not is_lora_name(k)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def set_lora_multiplier(model: nn.Module, multiplier: float) -> None:
    """Scale every adapter's output (0 switches them off); refused while merged."""
    for name, m in lora_modules(model).items():
        if m.lora_merged_scale is not None:
            raise RuntimeError(f"{name}: unmerge the LoRA before changing its multiplier")
        m.lora_multiplier = float(multiplier)
