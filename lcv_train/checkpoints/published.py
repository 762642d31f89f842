"""The published LongCat-Video DiT format: ``dit/config.json`` + (sharded) safetensors.

Loading needs no key mapping (our parameter names are the published ones); it checks that every
tensor is present with the right shape and names the first one that is not. Exporting writes the
same layout (consolidated, sharded by size, with ``diffusion_pytorch_model.safetensors.index.json``),
so a model trained here loads in the published inference code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lcv_train.errors import CheckpointError
from lcv_train.model.config import DiTConfig

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"


def dit_dir(path: str | Path) -> Path:
    """Accept the LongCat-Video folder (with ``dit/``) or the ``dit/`` folder itself."""
    p = Path(path).expanduser()
    if (p / "dit" / "config.json").is_file():
        return p / "dit"
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(f"no DiT config at {p / 'dit' / 'config.json'} (nor {p / 'config.json'}): point "
                            f"trainer.init_from at the LongCat-Video folder")


def read_dit_config(path: str | Path) -> DiTConfig:
    return DiTConfig.from_json(dit_dir(path) / "config.json")


def _weight_files(d: Path) -> list[Path]:
    index = d / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"weight shard {f} listed in {index} is missing")
        return files
    if (d / SINGLE_NAME).is_file():
        return [d / SINGLE_NAME]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {d} (expected {INDEX_NAME} or {SINGLE_NAME})")
    return files


def load_published_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(dit_dir(path)):
        sd.update(load_file(str(f)))
    return sd


def load_published_dit(model: torch.nn.Module, path: str | Path) -> None:
    """Copy published weights into ``model`` (a plain, unsharded ``LongCatDiT``), strictly."""
    d = dit_dir(path)
    have = read_dit_config(d)
    want = model.config
    for key in ("hidden_size", "depth", "num_heads", "in_channels", "out_channels", "caption_channels",
                "adaln_tembed_dim", "patch_size"):
        if getattr(have, key) != getattr(want, key):
            raise CheckpointError(f"{d / 'config.json'}: {key}={getattr(have, key)} but model.{key}="
                                  f"{getattr(want, key)}; use model=longcat-13.6b (or matching overrides)")
    sd = load_published_state_dict(d)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:
        raise CheckpointError(f"{d}: weight {missing[0]!r} is missing ({len(missing)} missing in all)")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{d}: weight {k!r} has shape {tuple(sd[k].shape)}, model expects {tuple(v.shape)}")
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointError(f"{d}: unexpected weight {unexpected[0]!r} ({len(unexpected)} in all); is this a "
                              f"LoRA file? load it with the LoRA loader instead")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)


def export_published_dit(state_dict: dict[str, torch.Tensor], config: DiTConfig, out: str | Path,
                         max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write ``out/dit/config.json`` and sharded safetensors; returns the ``dit`` folder. Written to a
    temporary folder and renamed, so a reader never sees half an export."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    final = out / "dit"
    tmp = out / "dit.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = SINGLE_NAME if len(shards) == 1 else f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
