"""The published LongCat-Video DiT format: ``dit/config.json`` + (sharded) safetensors.

Loading needs no key mapping (our parameter names are the published ones); it checks that every
tensor is present with the right shape and names the first one that is not. Exporting writes the
same layout (consolidated, sharded by size, with ``diffusion_pytorch_model.safetensors.index.json``),
so a model trained here loads in the published inference code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from lcv_train.errors import CheckpointError
from lcv_train.lora import is_lora_name
from lcv_train.model.config import PRESETS, DiTConfig

log = logging.getLogger("lcv_train")

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


def _published_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers only (no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(d):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        except Exception as e:  # a truncated or foreign file: name it
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return shapes


def _model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes of the model's parameters and buffers; works on meta, FSDP2 (DTensor) and
    ZeRO-3-partitioned (``ds_shape``) models. LoRA adapters are not part of the published DiT: left out."""
    from parallel.parallelize import canonical_name

    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {canonical_name(k): tuple(getattr(v, "ds_shape", v.shape)) for k, v in tensors if not is_lora_name(k)}


def _fitting_model(have: DiTConfig, keys: tuple[str, ...], differ: list[str]) -> str:
    """How to build the model a checkpoint was written for: the preset whose values it has, else the
    overrides of every differing key."""
    from lcv_train.model.config import preset

    for name in PRESETS:
        if all(getattr(preset(name), k) == getattr(have, k) for k in keys):
            return f"use model={name}"
    return "use " + " ".join(f"model.{k}={_override(getattr(have, k))}" for k in differ)


def _override(v) -> str:
    return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, (list, tuple)) else str(v)


ARCHITECTURE = ("hidden_size", "depth", "num_heads", "in_channels", "out_channels", "caption_channels",
                "adaln_tembed_dim", "patch_size")


def check_architecture(have: DiTConfig, want: DiTConfig, where: Path) -> None:
    """``CheckpointError`` naming the first size in which weights written for ``have`` (described by the file
    ``where``) do not fit a model of ``want``, and the model settings that fit them."""
    differ = [k for k in ARCHITECTURE if getattr(have, k) != getattr(want, k)]
    if differ:
        k = differ[0]
        raise CheckpointError(f"{where}: {k}={getattr(have, k)} but model.{k}={getattr(want, k)}; "
                              f"{_fitting_model(have, ARCHITECTURE, differ)}")


def check_published_dit(model: torch.nn.Module, path: str | Path) -> Path:
    """Check, from ``config.json`` and the safetensors headers only, that the published DiT at ``path`` loads
    strictly into ``model``; raise ``CheckpointError`` naming the first key that does not. Cheap: every
    rank runs it, so a bad checkpoint stops all ranks alike. Returns the ``dit/`` folder."""
    d = dit_dir(path)
    have = read_dit_config(d)
    want = model.config
    check_architecture(have, want, d / "config.json")
    shapes, own = _published_shapes(d), _model_shapes(model)
    lora = sorted(k for k in shapes if is_lora_name(k))
    if lora:
        raise CheckpointError(f"{d}: {lora[0]!r} is a LoRA weight, not a DiT weight; is this a LoRA file? load it "
                              f"with lcv_train.lora.load_published_lora(model, file)")
    missing = sorted(set(own) - set(shapes))
    if missing:
        raise CheckpointError(f"{d}: weight {missing[0]!r} is missing ({len(missing)} missing in all)")
    for k, shape in own.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{d}: weight {k!r} has shape {shapes[k]}, model expects {shape}")
    unexpected = sorted(set(shapes) - set(own))
    if unexpected:
        raise CheckpointError(f"{d}: unexpected weight {unexpected[0]!r} ({len(unexpected)} in all); is this a "
                              f"LoRA file? load it with lcv_train.lora.load_published_lora(model, file)")
    if want.attention == "bsa":
        for line in bsa_differences(have, want):
            log.warning("%s: %s", d / "config.json", line)
    return d


def bsa_differences(published: DiTConfig, model: DiTConfig) -> list[str]:
    """One line per ``bsa_params`` setting (sparsity, cdf_threshold, both block shapes) in which ``model``
    attends differently from the published weights' config; empty when they agree."""
    lines = []
    for key in ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k"):
        have, want = getattr(published.bsa, key), getattr(model.bsa, key)
        if have != want:
            shown = list(have) if isinstance(have, tuple) else have
            lines.append(f"bsa_params.{key}={shown} but model.bsa.{key}={want}: the weights were tuned and are "
                         f"served with the published value; set model.bsa.{key}={shown} to attend as they do")
    return lines


def load_published_dit(model: torch.nn.Module, path: str | Path) -> None:
    """Copy published weights into ``model`` (a plain, unsharded ``LongCatDiT``), strictly (checked first by
    ``check_published_dit``). Sharded models are filled tensor by tensor instead: see
    ``lcv_train.model.build.build_dit``. LoRA adapters, if any, are left as they are."""
    d = check_published_dit(model, path)
    own = {k: v for k, v in model.state_dict().items() if not is_lora_name(k)}
    sd = load_published_state_dict(d)
    missing, unexpected = model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=False)
    assert not unexpected and all(is_lora_name(k) for k in missing), (missing, unexpected)


def _normal_file_mode(path: Path) -> None:
    """safetensors writes its files 0600 (it writes a temporary file and renames it); give the exported
    weights the mode any other new file gets (0644 under the usual umask 022), so others can read them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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
        _normal_file_mode(tmp / name)
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
