"""Stand-in encoders: exact pixel codec, deterministic tiny umT5, and config validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lcv_train.encoders import build_text_encoder, build_video_codec
from lcv_train.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


# -- pixel codec ------------------------------------------------------------------------------------

def test_pixel_codec_is_exactly_invertible():
    codec = build_video_codec({"kind": "pixel"})
    assert (codec.latent_channels, codec.temporal_stride, codec.spatial_stride) == (16, 1, 2)
    video = torch.rand(2, 3, 5, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(video)
    assert latents.shape == (2, 16, 5, 4, 6) and latents.dtype == torch.float32
    assert torch.equal(codec.decode(latents), video)
    assert torch.count_nonzero(latents[:, 12:]) == 0
    # channel c*4 + dy*2 + dx of latent pixel (i, j) is 2 * pixel (2i+dy, 2j+dx) of colour c
    assert latents[1, 2 * 4 + 1 * 2 + 0, 3, 2, 5] == 2 * video[1, 2, 3, 2 * 2 + 1, 2 * 5 + 0]
    # roughly unit variance on the 12 data channels for uniform pixels (std 0.577 * 2)
    assert 0.9 < latents[:, :12].std().item() < 1.4


def test_pixel_codec_geometry_and_clamp():
    codec = build_video_codec({"kind": "pixel", "device": "cpu"})
    assert codec.latent_frames(7) == 7 and codec.pixel_frames(7) == 7
    assert codec.latent_shape(3, 16, 10) == (16, 3, 8, 5)
    with pytest.raises(ValueError, match="W=11"):
        codec.encode(torch.zeros(1, 3, 1, 8, 11))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        codec.encode(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="16"):
        codec.decode(torch.zeros(1, 12, 1, 4, 4))
    out = codec.decode(torch.full((1, 16, 2, 3, 3), 5.0))
    assert out.shape == (1, 3, 2, 6, 6) and out.max() == 1.0


def test_pixel_codec_is_frozen():
    codec = build_video_codec({"kind": "pixel"})
    codec.train()
    assert not codec.training and list(codec.parameters()) == []
    assert codec.to("cpu").device == torch.device("cpu")


# -- tiny umT5 --------------------------------------------------------------------------------------

CAPTIONS = ["a cat", "héllo wörld " * 10, ""]


def test_tiny_umt5_shapes_and_mask():
    text = build_text_encoder({"kind": "tiny_umt5"})
    assert text.dim == 32 and text.max_length == 32  # the defaults of conf/text_encoder/tiny_umt5.yaml
    emb, mask = text.encode(CAPTIONS + ["w " * 40])
    assert emb.shape == (4, 32, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    # one token per word + EOS, truncated to max_length; masks are prefixes
    assert mask.sum(1).tolist() == [3, 21, 1, 32]  # "héllo wörld " * 10 is 20 words; 40 words are cut
    assert torch.equal(mask, torch.arange(32)[None] < mask.sum(1, keepdim=True))
    assert torch.count_nonzero(emb[~mask]) == 0
    assert (emb[mask].abs().sum(-1) > 0).all()
    assert 0.3 < emb[mask].std().item() < 3.0


def test_tiny_umt5_byte_tokenizer():
    text = build_text_encoder({"kind": "tiny_umt5", "tokenizer": "bytes", "max_length": 96})
    emb, mask = text.encode(CAPTIONS)
    assert emb.shape == (3, 96, 32)
    assert mask.sum(1).tolist() == [len(b"a cat") + 1, 96, 1]  # bytes + EOS; the second (141 bytes) is cut


def test_word_tokenizer_gives_each_synthetic_word_its_own_id():
    """The demo's captions must stay readable: a hash collision between two of the synthetic world's words
    (say "red" and "left") would make two captions the same text for the DiT."""
    from data_loaders.synthetic import BACKGROUNDS, COLOURS, MOTIONS, SHAPES
    from lcv_train.encoders.standins import WordTokenizer

    words = {w for phrase in [*COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS, "a moves on gradient background"]
             for w in phrase.split()}
    tok = WordTokenizer()
    ids = {w: tok.ids(w) for w in words}
    assert all(len(v) == 1 for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(words) == 25
    assert tok.ids("A Red, circle!") == tok.ids("a red circle")  # case and punctuation do not matter


def test_tiny_umt5_padding_does_not_change_real_tokens():
    short = build_text_encoder({"kind": "tiny_umt5", "max_length": 8})
    long = build_text_encoder({"kind": "tiny_umt5", "max_length": 24})
    e8, m8 = short.encode(["a cat"])
    e24, _ = long.encode(["a cat"])
    torch.testing.assert_close(e8[m8], e24[0, : int(m8.sum())], rtol=1e-5, atol=1e-5)


def test_tiny_umt5_configurable_and_frozen():
    text = build_text_encoder({"kind": "tiny_umt5", "dim": 48, "max_length": 10, "num_heads": 3,
                               "num_layers": 1, "dtype": "bf16"})
    emb, mask = text.encode(["x"])
    assert emb.shape == (1, 10, 48) and emb.dtype == torch.float32 and mask.shape == (1, 10)
    text.train()
    assert not text.training and not any(p.requires_grad for p in text.parameters())
    assert next(text.parameters()).dtype == torch.bfloat16


def test_tiny_umt5_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = build_text_encoder({"kind": "tiny_umt5"})
    assert torch.equal(torch.rand(3), expected)
    b = build_text_encoder({"kind": "tiny_umt5"})
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.encode(CAPTIONS)[0], b.encode(CAPTIONS)[0])
    other_seed = build_text_encoder({"kind": "tiny_umt5", "seed": 1})
    assert not torch.equal(a.encode(CAPTIONS)[0], other_seed.encode(CAPTIONS)[0])


def test_tiny_umt5_identical_in_another_process():
    code = ("import torch; torch.manual_seed(99)\n"
            "from lcv_train.encoders import build_text_encoder\n"
            "e, _ = build_text_encoder({'kind': 'tiny_umt5'}).encode(%r)\n"
            "import sys; assert 'diffusers' not in sys.modules, 'stand-ins must not import diffusers'\n"
            "print(repr(e.flatten()[::97].tolist()))" % (CAPTIONS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    here = build_text_encoder({"kind": "tiny_umt5"}).encode(CAPTIONS)[0].flatten()[::97].tolist()
    assert eval(out) == here  # noqa: S307 - our own subprocess output


# -- config validation ------------------------------------------------------------------------------

def test_unknown_kind_names_key_and_choices():
    with pytest.raises(ValueError, match=r"vae\.kind='sd'.*pixel, wan2\.1"):
        build_video_codec({"kind": "sd"})
    with pytest.raises(ConfigError, match=r"text_encoder\.kind=None.*tiny_umt5, umt5_xxl"):
        build_text_encoder({})


@pytest.mark.parametrize("cfg,match", [
    ({"kind": "pixel", "dtyp": "bf16"}, r"vae\.dtyp"),
    ({"kind": "wan2.1", "path": "/x", "dtype": "int8"}, r"vae\.dtype='int8'"),
    ({"kind": "wan2.1", "path": "/x", "tiling": "yes"}, r"vae\.tiling"),
    ({"kind": "wan2.1"}, r"vae\.path is not set.*vae/config\.json"),
])
def test_codec_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_video_codec(cfg)


@pytest.mark.parametrize("cfg,match", [
    ({"kind": "tiny_umt5", "dim": 30, "num_heads": 4}, r"text_encoder\.dim=30"),
    ({"kind": "tiny_umt5", "max_length": 0}, r"text_encoder\.max_length"),
    ({"kind": "tiny_umt5", "seed": -1}, r"text_encoder\.seed"),
    ({"kind": "tiny_umt5", "tokenizer": "chars"}, r"text_encoder\.tokenizer='chars'.*bytes, words"),
    ({"kind": "umt5_xxl", "path": "???"}, r"text_encoder\.path is not set"),
])
def test_text_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_text_encoder(cfg)


def test_yaml_configs_build():
    codec = build_video_codec(OmegaConf.load(CONF / "vae" / "pixel.yaml"))
    assert codec.latent_channels == 16
    text = build_text_encoder(OmegaConf.load(CONF / "text_encoder" / "tiny_umt5.yaml"))
    assert text.dim == 32 and text.max_length == 32
    for group, name in (("vae", "wan2.1"), ("text_encoder", "umt5_xxl")):
        cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
        assert OmegaConf.is_missing(cfg, "path")
        build = build_video_codec if group == "vae" else build_text_encoder
        with pytest.raises(ConfigError, match=rf"{group}\.path is not set"):
            build(cfg)
