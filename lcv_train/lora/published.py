"""The published LongCat-Video LoRA file (refinement expert, CFG/step distillation): one safetensors file.

Each adapted module is named by its path with ``.`` replaced by ``___lorahyphen___`` and the prefix
``lora___lorahyphen___``; under that name (SPEC sections 1 and 9):

    <name>.lora_down.weight          [n*r, in]
    <name>.lora_up.weight            [out, r]      (n = 1)
    <name>.lora_up.blocks.<i>.weight [out/n, r]    (fused layers, i = 0..n-1)
    <name>.alpha_scale               []            alpha / rank, fp32

e.g. ``lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.lora_down.weight``.
The multiplier is not in the file: it is chosen when the LoRA is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from lcv_train.errors import CheckpointError
from lcv_train.lora.adapters import LoRALinear, attach_lora, lora_modules

PREFIX = "lora___lorahyphen___"
HYPHEN = "___lorahyphen___"
_KEY = re.compile(r"^(?P<module>[^.]+)\."
                  r"(?P<tensor>lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<i>\d+)\.weight|alpha_scale)$")


def published_module_key(module_name: str) -> str:
    """``blocks.0.attn.qkv`` ->
    ``lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv``."""
    return PREFIX + module_name.replace(".", HYPHEN)


def module_name_of(key: str) -> str:
    """The inverse of ``published_module_key``."""
    if not key.startswith(PREFIX):
        raise CheckpointError(f"LoRA module key {key!r} does not start with {PREFIX!r}")
    return key[len(PREFIX):].replace(HYPHEN, ".")


def published_lora_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's adapters in the published layout (``dtype`` for the weights; ``alpha_scale`` stays fp32)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype or t.dtype).contiguous()

    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        key = published_module_key(name)
        out[f"{key}.lora_down.weight"] = cast(m.lora_down.weight)
        if m.lora_parts > 1:
            for i, w in enumerate(m.up_weights()):
                out[f"{key}.lora_up.blocks.{i}.weight"] = cast(w)
        else:
            out[f"{key}.lora_up.weight"] = cast(m.lora_up.weight)
        out[f"{key}.alpha_scale"] = torch.tensor(m.lora_alpha_scale, dtype=torch.float32)
    if not out:
        raise CheckpointError("the model has no LoRA adapters to write")
    return out


def save_published_lora(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a published-layout state dict (``published_lora_state_dict``) to ``path``, atomically."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def read_published_lora(path: str | Path) -> dict[str, dict]:
    """Parse a published LoRA file: ``{module name: {"down": [n*r, in], "ups": [n x [out/n, r]], "alpha_scale"}}``.
    Raises ``CheckpointError`` naming the first key that does not fit the layout."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        if m is None:
            raise CheckpointError(f"{path}: key {k!r} is not in the LongCat LoRA layout "
                                  f"({PREFIX}<path>.lora_down.weight / .lora_up[.blocks.i].weight / .alpha_scale)")
        entry = mods.setdefault(module_name_of(m["module"]), {"ups": {}})
        if m["tensor"] == "alpha_scale":
            entry["alpha_scale"] = float(v)
        elif m["tensor"] == "lora_down.weight":
            entry["down"] = v
        else:
            entry["ups"][int(m["i"]) if m["i"] is not None else -1] = v
    for name, e in mods.items():
        key = published_module_key(name)
        for need in ("down", "alpha_scale"):
            if need not in e:
                raise CheckpointError(f"{path}: {key} has no {'lora_down.weight' if need == 'down' else need}")
        ups = e["ups"]
        if list(ups) == [-1]:
            e["ups"] = [ups[-1]]
        elif sorted(ups) == list(range(len(ups))) and ups:
            e["ups"] = [ups[i] for i in range(len(ups))]
        else:
            raise CheckpointError(f"{path}: {key} needs lora_up.weight or lora_up.blocks.0..n-1, got {sorted(ups)}")
        n, r = len(e["ups"]), e["ups"][0].shape[1]
        if e["down"].shape[0] != n * r or any(u.shape[1] != r for u in e["ups"]):
            raise CheckpointError(f"{path}: {key}: lora_down has {e['down'].shape[0]} rows, expected {n} up "
                                  f"block(s) x rank {r}")
    return mods


@torch.no_grad()
def load_published_lora(model: nn.Module, path: str | Path, multiplier: float = 1.0,
                        trainable: bool = False) -> list[str]:
    """Load a published LoRA file into ``model`` (a plain, unsharded ``LongCatDiT``): adapters are added to the
    linears the file names (rank, fused blocks and ``alpha_scale`` from the file) or, where the model already
    has adapters of that shape, overwritten. Base weights are untouched; the adapters train only if
    ``trainable``. Returns the adapted module names."""
    mods = read_published_lora(path)
    have = lora_modules(model)
    for name, e in sorted(mods.items()):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module {name!r} is not in the model") from None
        n, r = len(e["ups"]), e["ups"][0].shape[1]
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{path}: module {name!r} is a {type(linear).__name__}, not a Linear")
        if e["down"].shape[1] != linear.in_features or sum(u.shape[0] for u in e["ups"]) != linear.out_features:
            raise CheckpointError(f"{path}: {name}: LoRA maps {e['down'].shape[1]} -> "
                                  f"{sum(u.shape[0] for u in e['ups'])} features, the layer {linear.in_features} -> "
                                  f"{linear.out_features}")
        if name in have:
            if (have[name].lora_rank, have[name].lora_parts) != (r, n):
                raise CheckpointError(f"{path}: {name}: file has rank {r} x {n} block(s), the model's adapter "
                                      f"rank {have[name].lora_rank} x {have[name].lora_parts}")
            have[name].unmerge()
        else:
            attach_lora(linear, r, n)
        m: LoRALinear = linear
        m.lora_alpha_scale, m.lora_multiplier = e["alpha_scale"], float(multiplier)
        m.lora_down.weight.copy_(e["down"])
        for w, u in zip(m.up_weights(), e["ups"]):
            w.copy_(u)
        for p in (*m.lora_down.parameters(), *m.lora_up.parameters()):
            p.requires_grad_(trainable)
    return sorted(mods)
