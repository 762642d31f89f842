"""Tiny sampling setups: a random tiny DiT with the stand-in encoders, a run folder with a DCP checkpoint
as the trainer writes it, a published-format folder with a tiny Wan VAE and umT5, and LoRA files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from lcv_train.encoders.standins import PixelCodec, TinyUMT5TextEncoder
from lcv_train.model import LongCatDiT
from lcv_train.sampling.load import SamplingModel

SAMPLE = {"steps": 3, "shift": 3.0, "guidance": 3.0, "frames": 5, "height": 8, "width": 8, "fps": 8.0}


def random_tiny(seed: int = 0, **overrides) -> LongCatDiT:
    """The tiny preset with every weight random (its zero-initialised layers would make the output 0)."""
    torch.manual_seed(seed)
    m = LongCatDiT.from_preset("tiny", **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def tiny_sampling_model(seed: int = 0, **overrides) -> SamplingModel:
    return SamplingModel(model=random_tiny(seed, **overrides).requires_grad_(False), codec=PixelCodec(),
                         text_encoder=TinyUMT5TextEncoder(dim=32, max_length=16), shift=3.0, source=Path("."),
                         null_negative=True, defaults=dict(SAMPLE))


def write_run(root: Path, model: LongCatDiT, ema: LongCatDiT | None = None) -> Path:
    """``root`` as a run folder: config.yaml (stand-in encoders) and checkpoints/step_0000001 (DCP)."""
    root.mkdir(parents=True, exist_ok=True)
    conf = {"vae": {"kind": "pixel"}, "text_encoder": {"kind": "tiny_umt5", "dim": 32, "max_length": 16},
            "sample": dict(SAMPLE)}
    (root / "config.yaml").write_text(yaml.safe_dump(conf))
    step = root / "checkpoints" / "step_0000001"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd = {k: v.clone() for k, v in (ema or model).state_dict().items()}
    dcp.save({"engine": {"model": sd}, "ema": ema_sd}, checkpoint_id=str(step))
    (step / "meta.json").write_text(json.dumps({"model": model.config.to_json_dict(), "step": 1, "world_size": 1}))
    (root / "checkpoints" / "latest").write_text("step_0000001")
    return root


def write_lora(path: Path, model: LongCatDiT, rank: int = 4, seed: int = 1) -> Path:
    """A random published-format LoRA file for ``model``'s attention and FFN linears."""
    import copy

    from lcv_train.lora import LoRAConfig, add_lora, published_lora_state_dict, save_published_lora

    m = copy.deepcopy(model)
    add_lora(m, LoRAConfig(rank=rank, alpha=rank), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_published_lora(published_lora_state_dict(m), path)


def write_published(root: Path, seed: int = 0) -> Path:
    """A LongCat-Video-shaped folder: dit/ (tiny DiT), vae/ (tiny Wan 2.1), text_encoder/ + tokenizer/ (tiny
    umT5), scheduler/scheduler_config.json (shift 5)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from lcv_train.checkpoints import export_published_dit
    from tests.encoders.conftest import VAE_MEAN, VAE_STD, tiny_tokenizer

    model = random_tiny(seed)
    export_published_dit(model.state_dict(), model.config, root, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True], latents_mean=VAE_MEAN,
                         latents_std=VAE_STD).save_pretrained(root / "vae")
        tok = tiny_tokenizer()
        UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                    dropout_rate=0.0, feed_forward_proj="gated-gelu")).save_pretrained(
            root / "text_encoder")
        tok.save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 5.0}))
    return root
