"""Data-loading throughput: can the loader keep training fed?

Measures, on this machine's CPU:
  (a) decoding 480p 93-frame clips from mp4 (H.264, textured moving content, bucket 93x480x832 at 15 fps):
      decode-only samples/s (PyAV in one process) and end-to-end samples/s of ONE DataLoader worker
      (read tar + decode + resize/crop into the uint8 batch + hand-over to the main process);
  (b) reading cached latents (Wan 2.1 shapes: latents [16, 24, 60, 104] fp16, text [~200 of 512, 4096] fp16):
      samples/s of one worker;
  (d) the embedded default's synthetic set (32x32, 9 frames): samples/s of one worker;
  (c) the time training waits for data: a fake training step (sleep, as if the GPU were busy) of
      --step-s seconds per batch with --workers workers; reports the fraction of wall time spent in
      next(loader) after warm-up.

    python bench/data.py                 # full run (a few minutes on 2 cores)
    python bench/data.py --quick         # smaller numbers, for a smoke test
    python bench/data.py --json out.json

Numbers go into bench/RESULTS.md (section "Data loading").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_loaders import DataConfig, build_loader  # noqa: E402
from data_loaders.decode import decode_video, encode_mp4  # noqa: E402
from data_loaders.shards import ShardSetWriter  # noqa: E402


def textured_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Moving shapes over a panning smooth-noise texture with grain: compresses like real footage, not like flat colour."""
    rng = np.random.default_rng(seed)
    tw = width + frames * 4
    low = torch.from_numpy(rng.random((1, 3, height // 12 + 1, tw // 12 + 1)).astype(np.float32))
    tex = torch.nn.functional.interpolate(low, size=(height, tw), mode="bicubic", align_corners=False)
    tex = tex[0].permute(1, 2, 0).clamp(0, 1).numpy()  # smooth random texture, panned 4 px per frame
    out = np.empty((frames, height, width, 3), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(frames):
        img = tex[:height, i * 4 : i * 4 + width] * 200
        cx, cy = width * (0.2 + 0.6 * i / frames), height * (0.5 + 0.2 * np.sin(i / 9))
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < (height / 6) ** 2
        img[m] = (230, 40, 40)
        img += rng.normal(0, 4, img.shape[:2] + (1,))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_pixel_shards(d: str, clips: int, samples: int, frames: int, fps: float, height: int, width: int) -> float:
    """Write ``samples`` samples cycling over ``clips`` distinct mp4s; returns mean MB per clip."""
    datas = [encode_mp4(textured_clip(frames, height, width, s), fps, crf=23, preset="veryfast") for s in range(clips)]
    w = ShardSetWriter(d, "pixel", shard_size="200MB")
    for i in range(samples):
        meta = {"caption": f"clip {i}", "width": width, "height": height, "fps": fps, "num_frames": frames,
                "duration": frames / fps}
        w.write({"__key__": f"c{i:05d}", "mp4": datas[i % clips], "json": meta})
    w.finish()
    return float(np.mean([len(x) for x in datas])) / 1e6


def make_latent_shards(d: str, samples: int, bucket: list[int]) -> None:
    rng = np.random.default_rng(0)
    w = ShardSetWriter(d, "latent", shard_size="200MB")
    lat = rng.standard_normal((16, 24, 60, 104)).astype(np.float16)
    for i in range(samples):
        L = int(rng.integers(120, 300))
        txt = rng.standard_normal((L, 4096)).astype(np.float16)
        b1, b2 = io.BytesIO(), io.BytesIO()
        np.save(b1, lat)
        np.save(b2, txt)
        meta = {"caption": f"clip {i}", "bucket": bucket, "latent_shape": list(lat.shape), "text_length": 512}
        w.write({"__key__": f"l{i:05d}", "latents.npy": b1.getvalue(), "text.npy": b2.getvalue(), "json": meta})
    w.finish()


def loader_rate(cfg: DataConfig, batches: int, warmup: int = 2) -> float:
    """Samples/s of the loader over ``batches`` batches after ``warmup`` (includes worker start-up amortised out)."""
    loader = build_loader(cfg, 0, 1, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["keys"])
    dt = time.perf_counter() - t0
    loader.close()
    return n / dt


def wait_fraction(cfg: DataConfig, steps: int, step_s: float, warmup: int = 3) -> dict:
    loader = build_loader(cfg, 0, 1, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
        time.sleep(step_s)
    w0 = loader.metrics()["data/wait_s"]
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
        time.sleep(step_s)  # the GPU step; CPU free for the workers
    wall = time.perf_counter() - t0
    waited = loader.metrics()["data/wait_s"] - w0
    loader.close()
    return {"steps": steps, "step_s": step_s, "wall_s": wall, "wait_s": waited, "wait_fraction": waited / wall}


def tiny_rate(tmp: str, batches: int) -> float:
    from data_loaders import ensure_synthetic_shards

    d = ensure_synthetic_shards(os.path.join(tmp, "syn"), n=256, frames=9, height=32, width=32, fps=8.0, seed=0)
    cfg = DataConfig(shards=[d], buckets=[[9, 32, 32]], batch_size=8, num_workers=1, fps=8.0, temporal_stride=1)
    return loader_rate(cfg, batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="workers for the wait-time measurement")
    p.add_argument("--step-s", type=float, default=None, help="fake training step per batch (default: 1.5x the per-worker decode time / workers)")
    p.add_argument("--latent-step-s", type=float, default=0.05, help="fake training step per batch for cached latents")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    F, H, W, fps = 93, 480, 832, 15.0
    src_h, src_w = 480, 854
    clips, samples, batches = (2, 8, 4) if args.quick else (4, 24, 12)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cpu, torch {torch.__version__}",
                 "bucket": [F, H, W], "fps": fps}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mb = make_pixel_shards(os.path.join(tmp, "px"), clips, samples, F, fps, src_h, src_w)
        res["pixel_clip_mb"] = mb
        res["make_pixel_s"] = time.perf_counter() - t
        # (a) decode only, one process
        data = encode_mp4(textured_clip(F, src_h, src_w, 99), fps, crf=23, preset="veryfast")
        decode_video(data, F, H, W, fps)
        t = time.perf_counter()
        reps = 2 if args.quick else 4
        for _ in range(reps):
            decode_video(data, F, H, W, fps)
        res["decode_only_samples_per_s"] = reps / (time.perf_counter() - t)
        # (a) one worker, end to end
        px = DataConfig(shards=[os.path.join(tmp, "px")], buckets=[[F, H, W]], batch_size=1, num_workers=1, fps=fps,
                        shuffle_buffer=2, prefetch_factor=2)
        res["pixel_worker_samples_per_s"] = loader_rate(px, batches)
        # (b) cached latents, one worker
        make_latent_shards(os.path.join(tmp, "lat"), 64 if not args.quick else 16, [F, H, W])
        lat = DataConfig(shards=[os.path.join(tmp, "lat")], buckets=[[F, H, W]], batch_size=1, num_workers=1, fps=fps,
                         shuffle_buffer=2)
        res["latent_worker_samples_per_s"] = loader_rate(lat, 40 if not args.quick else 10)
        # (c) waiting for data with N workers and a fake step
        step = args.step_s if args.step_s is not None else 1.5 / res["pixel_worker_samples_per_s"] / args.workers
        res["wait_pixel"] = wait_fraction(DataConfig(**{**px.__dict__, "num_workers": args.workers}), 6 if args.quick else 16, step)
        res["wait_pixel"]["workers"] = args.workers
        lat_step = args.latent_step_s
        res["wait_latent"] = wait_fraction(DataConfig(**{**lat.__dict__, "num_workers": args.workers}), 20 if args.quick else 60, lat_step)
        res["wait_latent"]["workers"] = args.workers
        res["tiny_worker_samples_per_s"] = tiny_rate(tmp, 10 if args.quick else 40)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
