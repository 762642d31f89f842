"""The real loaders (Wan 2.1 VAE, umT5) on a tiny random checkpoint folder laid out like the published one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lcv_train.encoders import build_text_encoder, build_video_codec


def _video(b=2, f=5, h=16, w=24, seed=0):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return build_video_codec({"kind": "wan2.1", "path": str(tiny_checkpoint), "dtype": "fp32"})


@pytest.fixture(scope="module")
def reference_vae(tiny_checkpoint):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(tiny_checkpoint / "vae")).eval()


# -- Wan VAE ----------------------------------------------------------------------------------------

def test_wan_geometry(codec):
    assert (codec.latent_channels, codec.temporal_stride, codec.spatial_stride) == (16, 4, 8)
    assert [codec.latent_frames(f) for f in (1, 5, 9, 93)] == [1, 2, 3, 24]
    assert codec.pixel_frames(24) == 93
    for bad in (0, 2, 6, 92):
        with pytest.raises(ValueError, match=f"F={bad}"):
            codec.latent_frames(bad)
    with pytest.raises(ValueError, match="F=6"):
        codec.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="H=12"):
        codec.encode(torch.zeros(1, 3, 5, 12, 16))


def test_wan_encode_is_normalized_posterior_mean(codec, reference_vae, tiny_checkpoint, vae_stats):
    video = _video()
    latents = codec.encode(video)
    assert latents.shape == (2, 16, 2, 2, 3) and latents.dtype == torch.float32
    # independently: the diffusers model's own posterior mean, normalized with the constants in config.json
    config = json.loads((tiny_checkpoint / "vae" / "config.json").read_text())
    assert config["latents_mean"] == pytest.approx(vae_stats[0])
    assert config["latents_std"] == pytest.approx(vae_stats[1])
    mean = torch.tensor(config["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        raw = reference_vae.encode(video).latent_dist.mean
    torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_wan_decode_denormalizes(codec, reference_vae, vae_stats):
    latents = codec.encode(_video(b=1, f=9, h=16, w=16))
    video = codec.decode(latents)
    assert video.shape == (1, 3, 9, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    mean = torch.tensor(vae_stats[0]).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae_stats[1]).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = reference_vae.decode(latents * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)
    # single images are 1-frame videos
    assert codec.decode(codec.encode(_video(b=1, f=1))).shape == (1, 3, 1, 16, 24)


def test_wan_sample_posterior(tiny_checkpoint, codec):
    sampler = build_video_codec({"kind": "wan2.1", "path": str(tiny_checkpoint), "dtype": "fp32",
                                 "sample_posterior": True})
    video = _video(b=1)
    a = sampler.encode(video, generator=torch.Generator().manual_seed(3))
    b = sampler.encode(video, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, codec.encode(video))


def test_wan_frozen_and_bf16_from_yaml(tiny_checkpoint):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "vae" / "wan2.1.yaml")
    cfg.path = str(tiny_checkpoint)
    codec = build_video_codec(cfg)
    assert codec.dtype == torch.bfloat16
    codec.train()
    assert not codec.training and not codec.vae.training
    assert not any(p.requires_grad for p in codec.parameters())
    latents = codec.encode(_video(b=1, f=1, h=16, w=16))
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 1, 2, 2)


def test_wan_missing_files(tmp_path, tiny_checkpoint):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"vae\.path=.*nowhere.*vae/config\.json"):
        build_video_codec({"kind": "wan2.1", "path": str(missing)})
    (tmp_path / "ckpt" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"missing .*ckpt/vae/config\.json; set vae\.path="):
        build_video_codec({"kind": "wan2.1", "path": str(tmp_path / "ckpt")})
    shutil.copy(tiny_checkpoint / "vae" / "config.json", tmp_path / "ckpt" / "vae" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"ckpt/vae/diffusion_pytorch_model\.safetensors"):
        build_video_codec({"kind": "wan2.1", "path": str(tmp_path / "ckpt")})


# -- umT5 -------------------------------------------------------------------------------------------

CAPTIONS = ["a cat runs on the beach", "red car", "a dog in snow at sunset on the beach at sunset a cat"]


@pytest.fixture(scope="module")
def text(tiny_checkpoint):
    return build_text_encoder({"kind": "umt5_xxl", "path": str(tiny_checkpoint), "max_length": 12,
                               "dtype": "fp32"})


def test_umt5_matches_reference_and_zeroes_padding(text, tiny_checkpoint):
    from transformers import AutoTokenizer, UMT5EncoderModel

    assert text.dim == 32 and text.max_length == 12
    emb, mask = text.encode(CAPTIONS)
    assert emb.shape == (3, 12, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    # words + EOS; the long caption is truncated to max_length with EOS kept
    assert mask.sum(1).tolist() == [7, 3, 12]
    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint / "tokenizer"))
    ids = tok(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert torch.equal(mask, ids["attention_mask"].bool())
    assert ids["input_ids"][2, -1].item() == tok.eos_token_id
    model = UMT5EncoderModel.from_pretrained(str(tiny_checkpoint / "text_encoder")).eval()
    with torch.no_grad():
        ref = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(emb[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(emb[~mask]) == 0 and torch.count_nonzero(ref[~mask]) > 0


def test_umt5_frozen_and_bf16(tiny_checkpoint):
    text = build_text_encoder({"kind": "umt5_xxl", "path": str(tiny_checkpoint), "max_length": 8})
    assert next(text.parameters()).dtype == torch.bfloat16
    text.train()
    assert not text.training and not any(p.requires_grad for p in text.parameters())
    emb, mask = text.encode(["a cat"])
    assert emb.shape == (1, 8, 32) and emb.dtype == torch.float32 and mask.sum() == 3


def test_umt5_missing_files(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.path=.*text_encoder/config\.json"):
        build_text_encoder({"kind": "umt5_xxl", "path": str(tmp_path / "nowhere")})
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint / "text_encoder", ckpt / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"ckpt/tokenizer/tokenizer\.json"):
        build_text_encoder({"kind": "umt5_xxl", "path": str(ckpt)})
    (ckpt / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/text_encoder/model\.safetensors"):
        build_text_encoder({"kind": "umt5_xxl", "path": str(ckpt)})
