"""Curation throughput: clips per second per core of ``lcv-data curate`` on 480p input.

Generates --videos raw H.264 videos at 854x480, 24 fps, --seconds long, with a hard cut every
--scene-s seconds and textured content panning at different speeds (letterboxed every other video),
then runs the whole local pipeline (probe, dedup, scene cuts, crop, blur, motion, attributes,
cutting, captions from sidecars, augmentation, clustering, shards) with --workers processes and
reports clips/s per core from the wall time, and clips per CPU-second (the CPU time of this process
and its workers), which stays meaningful on a shared, loaded machine.

    python bench/curate.py                 # 4 videos x 12 s, 1 worker
    python bench/curate.py --quick         # 2 videos x 6 s
    python bench/curate.py --workers 2

Numbers go into bench/RESULTS.md (section "Data curation").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_loaders.curate import CurateConfig, curate  # noqa: E402

W, H, FPS = 854, 480, 24


def make_video(path: str, seconds: float, scene_s: float, seed: int, letterbox: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(seconds * FPS)
    with av.open(path, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast"}
        base = None
        for i in range(n):
            if i % int(scene_s * FPS) == 0:
                small = rng.integers(40, 256, size=(H // 8 + 1, W // 4 + 1, 3)).astype(np.uint8)
                base = np.repeat(np.repeat(small, 8, 0), 8, 1)[:H, : 2 * W]
                speed = int(rng.integers(0, 6))
            frame = np.roll(base, -i * speed, axis=1)[:, :W].copy()
            if letterbox:
                frame[:60] = 0
                frame[-60:] = 0
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write(f"a textured test pattern number {seed} panning sideways")


def _cpu() -> float:
    r = os.times()
    return r.user + r.system + r.children_user + r.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--scene-s", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.videos, args.seconds = 2, 6.0
    tmp = tempfile.mkdtemp(prefix="curate-bench-")
    try:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        for v in range(args.videos):
            make_video(os.path.join(raw, f"v{v:03d}.mp4"), args.seconds, args.scene_s, v, letterbox=v % 2 == 1)
        cfg = CurateConfig(input=raw, out=os.path.join(tmp, "out"), workers=args.workers, clusters=2)
        t0, c0 = time.perf_counter(), _cpu()
        summary = curate(cfg)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        cores = max(1, min(args.workers or os.cpu_count() or 1, args.videos))
        row = {
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
            "date": time.strftime("%Y-%m-%d"),
            "input": f"{args.videos} x {args.seconds:g} s, {W}x{H} {FPS} fps H.264, cut every {args.scene_s:g} s",
            "workers": cores,
            "clips": summary["clips"],
            "seconds": round(dt, 2),
            "clips_per_s": round(summary["clips"] / dt, 3),
            "clips_per_s_per_core": round(summary["clips"] / dt / cores, 3),
            "cpu_s": round(cpu, 2),
            "clips_per_cpu_s": round(summary["clips"] / cpu, 3),
            "video_s_per_cpu_s": round(args.videos * args.seconds / cpu, 3),
            "load": round(os.getloadavg()[0], 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = ("machine", "date", "input", "workers", "load", "clips", "seconds", "clips_per_s", "clips_per_s_per_core",
            "cpu_s", "clips_per_cpu_s", "video_s_per_cpu_s")
    print("| machine | date | input | workers | load avg | clips | wall s | clips/s | clips/s/core | CPU s | clips/CPU-s"
          " | video s/CPU-s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("| " + " | ".join(str(row[k]) for k in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
