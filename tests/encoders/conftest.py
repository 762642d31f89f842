"""A tiny random checkpoint folder laid out like the published LongCat-Video one (vae/, text_encoder/,
tokenizer/), built with the real diffusers / transformers classes and written with save_pretrained."""

from __future__ import annotations

import pytest
import torch

WORDS = ["a", "cat", "dog", "runs", "on", "the", "beach", "at", "sunset", "red", "car", "in", "snow"]
VAE_MEAN = [0.1 * i - 0.7 for i in range(16)]
VAE_STD = [0.5 + 0.15 * i for i in range(16)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def vae_stats():
    """The non-default per-channel (latents_mean, latents_std) written into the tiny VAE's config."""
    return VAE_MEAN, VAE_STD


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("LongCat-Video-tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=VAE_MEAN,
                               latents_std=VAE_STD)
        vae.save_pretrained(root / "vae")
        tokenizer = tiny_tokenizer()
        config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            dropout_rate=0.0, feed_forward_proj="gated-gelu")
        UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
        tokenizer.save_pretrained(root / "tokenizer")
    return root
