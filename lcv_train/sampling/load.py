"""One function builds a model ready to sample from any source: ``load_sampling_model(source, ...)``.

Sources:

- a run directory (``config.yaml`` + ``checkpoints/latest``), a run's ``checkpoints`` directory or one
  ``step_N`` checkpoint, of any layout (single, FSDP, HSDP, ZeRO, tensor parallel; LoRA runs with their
  adapters): the DiT from the model or EMA weights, the VAE and text encoder from the run's config;
- a published-format folder (``dit/config.json`` + safetensors: the LongCat-Video download or an
  ``lcv-export`` output): the DiT strictly, the Wan 2.1 VAE (``vae/``) and umT5 (``text_encoder/``,
  ``tokenizer/``) from the same folder, the shift from ``scheduler/scheduler_config.json``.

``vae`` / ``text_encoder`` override the encoders with a config mapping (``{"kind": "pixel"}``, ...), e.g.
for an exported tiny model that was trained with the stand-ins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcv_train.encoders import TextEncoder, VideoCodec, build_text_encoder, build_video_codec
from lcv_train.errors import CheckpointError, ConfigError

PUBLISHED_SHIFT = 12.0  # the published scheduler's shift when a folder has no scheduler config


@dataclass
class SamplingModel:
    model: torch.nn.Module
    codec: VideoCodec
    text_encoder: TextEncoder
    shift: float
    source: Path
    run_dir: Path | None = None  # our checkpoints: the run folder (samples go under it)
    null_negative: bool = False  # the unconditional branch is training's null text (ours), not "" (published)
    defaults: dict[str, Any] = field(default_factory=dict)  # frames/height/width/fps the run sampled at

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _run_dir_of(ckpt: Path) -> Path | None:
    for d in (ckpt.parent.parent, ckpt.parent, ckpt):
        if (d / "config.yaml").is_file():
            return d
    return None


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _dit(source: Path, cfg, weights: str, dtype: torch.dtype):
    """The DiT of ``cfg`` with the weights of ``source`` (``lcv_train.checkpoints.init_source``: a published
    folder or one of our checkpoints, any layout; a LoRA run comes with its adapters merged), cast to
    ``dtype``. Built on the meta device and given the tensors: no random initialisation and one copy of the
    weights in host memory, which matters at 13.6B parameters."""
    from lcv_train.checkpoints import init_source
    from lcv_train.model import LongCatDiT

    with torch.device("meta"):
        model = LongCatDiT(cfg, seed=0)
    sd = init_source(model, source, weights).read()
    model.load_state_dict({k: sd[k].to(dtype) for k in model.state_dict()}, strict=True, assign=True)
    return model


def published_shift(folder: Path) -> float:
    cfg = folder / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        return float(json.loads(cfg.read_text()).get("shift", PUBLISHED_SHIFT))
    return PUBLISHED_SHIFT


def load_sampling_model(source: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, vae: dict | None = None,
                        text_encoder: dict | None = None) -> SamplingModel:
    """The DiT (eval mode, ``dtype`` on ``device``), its VAE and text encoder, and the sampling defaults of
    ``source`` (see the module docstring). Raises FileNotFoundError / CheckpointError / ConfigError with
    one line naming the file or key."""
    from lcv_train.checkpoints import read_dit_config
    from lcv_train.checkpoints.ours import read_meta, resolve_checkpoint
    from lcv_train.model import DiTConfig

    if weights not in ("ema", "model"):
        raise ConfigError(f"weights={weights!r}: choose ema or model")
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"ckpt={source}: no such file or folder")
    published = (src / "dit" / "config.json").is_file() or (
        (src / "config.json").is_file() and not (src / "meta.json").is_file())
    if published:
        root = src if (src / "dit").is_dir() else src.parent
        model = _dit(src, read_dit_config(src), weights, dtype)
        vae = vae or {"kind": "wan2.1", "path": str(root), "dtype": "fp32" if dtype == torch.float32 else "bf16"}
        text_encoder = text_encoder or {"kind": "umt5_xxl", "path": str(root),
                                        "dtype": "fp32" if dtype == torch.float32 else "bf16"}
        sm_kw = dict(shift=published_shift(root), source=src, null_negative=False,
                     defaults={"frames": 93, "height": 480, "width": 832, "fps": 15.0})
    else:
        ckpt = resolve_checkpoint(src)
        run_dir = _run_dir_of(ckpt)
        conf = _read_yaml(run_dir / "config.yaml") if run_dir else {}
        if (vae is None or text_encoder is None) and not conf:
            raise CheckpointError(f"{ckpt}: no config.yaml in its run folder to say which VAE and text encoder "
                                  f"it was trained with; pass vae=... and text_encoder=...")
        model = _dit(ckpt, DiTConfig.from_json_dict(read_meta(ckpt)["model"]), weights, dtype)
        vae, text_encoder = vae or conf["vae"], text_encoder or conf["text_encoder"]
        s = conf.get("sample", {})
        sm_kw = dict(shift=float(s.get("shift", PUBLISHED_SHIFT)), source=ckpt, run_dir=run_dir, null_negative=True,
                     defaults={k: s[k] for k in ("frames", "height", "width", "fps", "steps", "guidance") if k in s})
    vae = {**vae, "device": str(device)}
    text_encoder = {**text_encoder, "device": str(device)}
    try:
        codec = build_video_codec(vae)
        text = build_text_encoder(text_encoder)
    except FileNotFoundError as e:  # e.g. an lcv-export folder holds dit/ only
        raise FileNotFoundError(f"{e} (lcv-sample: vae=<LongCat-Video folder> text_encoder=<LongCat-Video folder>, "
                                f"or vae=pixel text_encoder=tiny_umt5 for a model trained with the stand-ins)") from None
    cfg = model.config
    if text.dim != cfg.caption_channels:
        raise ConfigError(f"text_encoder: produces {text.dim}-dim embeddings but the DiT's caption_channels="
                          f"{cfg.caption_channels}")
    if codec.latent_channels != cfg.in_channels:
        raise ConfigError(f"vae: produces {codec.latent_channels} latent channels but the DiT's in_channels="
                          f"{cfg.in_channels}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return SamplingModel(model=model, codec=codec, text_encoder=text, **sm_kw)


def use_lora(model: torch.nn.Module, path: str | Path, multiplier: float = 1.0) -> list[str]:
    """Switch ``model`` to the published-format LoRA file at ``path`` (distillation, refinement or an
    ``lcv-export --lora`` output): its adapters are loaded (``lcv_train.lora.load_published_lora``, added or
    overwritten in place) and adapters the file does not name are switched off (multiplier 0). Unmerged, so
    the next ``use_lora`` can replace it."""
    from lcv_train.lora import load_published_lora, lora_modules

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} not found (a published-format .safetensors: the LongCat "
                                f"distillation / refinement LoRA or an lcv-export --lora output)")
    dtype = next(model.parameters()).dtype
    names = set(load_published_lora(model, p, multiplier=multiplier))
    for name, m in lora_modules(model).items():
        m.to(dtype)
        if name not in names:
            m.lora_multiplier = 0.0
    return sorted(names)
