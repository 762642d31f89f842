"""Stand-in encoders for the embedded default: no download, fast on CPU, identical in every process.

* ``PixelCodec`` (``vae.kind=pixel``): an exactly invertible pixel "VAE". Each 2x2 patch of the 3 colour
  channels becomes 12 channels, 4 zero channels pad them to the 16 the DiT expects, and the result is
  multiplied by 2 (a power of two, so ``decode(encode(x)) == x`` bit for bit) to give roughly unit
  variance for natural video in [-1, 1]. Temporal stride 1, spatial stride 2. Samples stay viewable.
* ``TinyUMT5TextEncoder`` (``text_encoder.kind=tiny_umt5``): a tiny ``transformers.UMT5EncoderModel``
  whose weights are drawn from a ``torch.Generator`` seeded by ``seed`` (not from the global RNG and not
  from transformers' initialiser), fed by ``WordTokenizer`` (one hashed id per word; the default) or
  ``ByteTokenizer`` (UTF-8 bytes). Same seed, dims and tokenizer -> same weights on every rank and run.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from lcv_train.encoders.base import TextEncoder, VideoCodec


class PixelCodec(VideoCodec):
    latent_channels = 16
    temporal_stride = 1
    spatial_stride = 2
    scale = 2.0  # power of two: exact in every float format

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        # Holds no weights; the buffer only records the device that .to() moves the codec to.
        self.register_buffer("_anchor", torch.zeros((), device=device), persistent=False)
        self.freeze()

    def _encode(self, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, f, h, w = video.shape
        s = self.spatial_stride
        x = video.reshape(b, c, f, h // s, s, w // s, s)
        x = x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * s * s, f, h // s, w // s)
        pad = x.new_zeros(b, self.latent_channels - c * s * s, f, h // s, w // s)
        return torch.cat([x, pad], dim=1) * self.scale

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        s = self.spatial_stride
        x = latents[:, : 3 * s * s] * (1.0 / self.scale)
        x = x.reshape(b, 3, s, s, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, 3, f, h * s, w * s)


class _Tokenizer:
    """Token ids ``[B, max_length]`` and a prefix mask from ``ids(caption)``: id 0 = pad, 1 = EOS (appended, as
    T5 does; kept when a caption is cut to ``max_length``), 2 = unk (unused), real tokens from 3."""

    pad_id = 0
    eos_id = 1
    offset = 3
    vocab_size: int  # and ``ids(caption) -> list[int]``: each subclass's own reading of a caption

    def __call__(self, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(captions), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), max_length), dtype=torch.bool)
        for i, caption in enumerate(captions):
            tokens = self.ids(caption)[: max_length - 1] + [self.eos_id]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = True
        return ids, mask


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes, one token each."""

    vocab_size = 256 + _Tokenizer.offset

    def ids(self, caption: str) -> list[int]:
        return [b + self.offset for b in caption.encode("utf-8")]


class WordTokenizer(_Tokenizer):
    """Lower-cased words (runs of letters and digits), each hashed with CRC-32 to one of 4096 ids. Any text
    works; the synthetic world's 25 words get 25 distinct ids (tested). One token per word, so a word's
    meaning sits in one place: a tiny random encoder keeps "red" and "blue" far easier to tell apart than
    byte runs."""

    vocab_size = 4096 + _Tokenizer.offset

    def ids(self, caption: str) -> list[int]:
        words = re.findall(r"[^\W_]+", caption.lower())
        return [self.offset + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - self.offset) for w in words]


TOKENIZERS = {"bytes": ByteTokenizer, "words": WordTokenizer}


def _seeded_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a private generator, in name order; independent of transformers."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("layer_norm.weight"):
            value = torch.ones(p.shape)
        elif name.endswith("relative_attention_bias.weight"):
            value = torch.randn(p.shape, generator=gen) * 0.1
        elif name == "shared.weight" or name.endswith("embed_tokens.weight"):
            value = torch.randn(p.shape, generator=gen)
        elif p.ndim == 2:  # Linear [out, in]
            value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
        else:  # pragma: no cover - UMT5 has no other kinds today
            raise RuntimeError(f"tiny_umt5: no init rule for parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value)


class TinyUMT5TextEncoder(TextEncoder):
    def __init__(self, dim: int = 32, max_length: int = 32, num_layers: int = 2, num_heads: int = 4,
                 seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tokenizer: str = "words") -> None:
        super().__init__()
        from transformers import UMT5Config, UMT5EncoderModel

        self.dim = dim
        self.max_length = max_length
        self.tokenizer = TOKENIZERS[tokenizer]()
        config = UMT5Config(
            vocab_size=self.tokenizer.vocab_size, d_model=dim, d_kv=dim // num_heads, d_ff=2 * dim,
            num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            pad_token_id=ByteTokenizer.pad_id, eos_token_id=ByteTokenizer.eos_id,
        )
        # transformers' own initialiser draws from the global RNG: keep the caller's stream untouched.
        with torch.random.fork_rng(devices=[]):
            model = UMT5EncoderModel(config)
        _seeded_init_(model, seed)
        self.model = model.to(device=device, dtype=dtype)
        self.freeze()

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out, mask
