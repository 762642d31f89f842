"""``lcv-data encode``: pixel shards -> cached-latent shards (VAE latents + text embeddings).

Each output sample holds ``latents.npy`` ([C, T, h, w], normalized as the codec returns them),
``text.npy`` ([L_real, D], the encoder's output without padding) and the source ``.json`` extended
with ``bucket`` ([F, H, W] it was encoded at), ``latent_shape`` and ``text_length`` (the encoder's padded
length, restored at load time). The loader groups cached samples by that bucket, so training reads
pixel or cached shards with the same ``data`` config (the bucket table must contain the bucket).

The codec and text encoder are any objects with the ``lcv_train.encoders`` interface; the CLI builds
them from ``conf/vae/*.yaml`` / ``conf/text_encoder/*.yaml`` (imported only when the command runs).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from data_loaders.config import DataConfig, validate
from data_loaders.decode import video_to_float
from data_loaders.loader import VideoLoader
from data_loaders.shards import INDEX_NAME, ShardSetWriter

log = logging.getLogger("data_loaders")


def _npy(a: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.detach().to("cpu", torch.float32).numpy().astype(np.float16 if dtype == "fp16" else np.float32))
    return buf.getvalue()


def encode_shards(
    shards: Sequence[str],
    out_dir: str,
    codec: Any,
    text_encoder: Any,
    data: Optional[DataConfig] = None,
    shard_size: str | int = "1GB",
    dtype: str = "fp16",
    num_workers: int = 1,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Encode every usable sample of ``shards`` once (bucket and temporal crop as in epoch 0).

    ``data`` supplies buckets, fps and batch size (shuffling, tasks and epochs are overridden). With
    ``world_size`` > 1, process ``rank`` encodes its exact share (the training split: every sample in
    exactly one share) into its own ``out_dir``; list all the output dirs in ``data.shards``.
    """
    if dtype not in ("fp16", "fp32"):
        raise ValueError(f"--dtype {dtype!r}: choose fp16 or fp32")
    base = data or DataConfig()
    cfg = replace(base, shards=list(shards), subsets={}, num_workers=num_workers, shuffle=False, epochs=1,
                  tasks={"t2v": 1.0}, temporal_stride=int(getattr(codec, "temporal_stride", base.temporal_stride)),
                  max_empty_epochs=10**9)
    validate(cfg)
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        os.remove(os.path.join(out_dir, INDEX_NAME))
    loader = VideoLoader(cfg, rank, world_size, 0)
    loader.plan.with_meta = True
    writer = ShardSetWriter(out_dir, "latent", shard_size, extra={
        "encode": {"source": [str(s) for s in shards], "codec": type(codec).__name__,
                   "text_encoder": type(text_encoder).__name__, "fps": cfg.fps, "dtype": dtype,
                   "temporal_stride": cfg.temporal_stride, "buckets": [list(b) for b in cfg.buckets]}})
    n = 0
    try:
        for batch in loader:
            lat = codec.encode(video_to_float(batch["video"]))
            emb, mask = text_encoder.encode(list(batch["caption"]))
            for i, key in enumerate(batch["keys"]):
                meta = dict(batch["meta"][i])
                valid = mask[i].bool()
                meta.update(bucket=list(batch["bucket"]), latent_shape=list(lat[i].shape), text_length=int(mask.shape[1]),
                            caption=batch["caption"][i], subset=meta.get("subset", batch["subset"][i]))
                writer.write({"__key__": key, "latents.npy": _npy(lat[i], dtype), "text.npy": _npy(emb[i][valid], dtype), "json": meta})
                n += 1
            if progress and n % 100 < len(batch["keys"]):
                log.info("encode: %d samples", n)
    finally:
        loader.close()
    writer.extra["encode"]["skipped"] = {k: v for k, v in loader.metrics().items() if k.startswith("data/skipped/") and v}
    index = writer.finish()
    return {"written": n, "shards": len(writer.shards), "index": index, "metrics": loader.metrics()}


def compose_encoder_config(overrides: Sequence[str], config_dir: Optional[str] = None):
    """Compose ``vae`` and ``text_encoder`` from the repo's ``conf/`` with Hydra-style overrides.

    ``vae=pixel text_encoder=tiny_umt5 vae.path=/x`` select the groups ``conf/vae/pixel.yaml`` and
    ``conf/text_encoder/tiny_umt5.yaml`` and set keys inside them.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if config_dir is None:
        import importlib.resources

        config_dir = str(importlib.resources.files("conf"))
    ovr = []
    for o in overrides:
        k = o.split("=", 1)[0]
        if k in ("vae", "text_encoder"):
            o = "+" + o  # select the group (there is no defaults list here)
        ovr.append(o)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        cfg = compose(config_name=None, overrides=ovr)
    for group in ("vae", "text_encoder"):
        if group not in cfg:
            raise ValueError(f"lcv-data encode: choose a {group} (e.g. {group}={'pixel' if group == 'vae' else 'tiny_umt5'})")
    return cfg
