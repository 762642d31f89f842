"""Tiny raw videos with known properties for the curation tests (64x48, 12 fps, PyAV + numpy).

- ``cuts.mp4``: 36 frames, hard cuts at frames 12 and 24 (three different textures), keyframe every 12.
- ``bars.mp4``: a textured picture inside black bars: 8 px top and bottom, 4 px left and right.
- ``sharp.mp4``: a sharp texture panning 2 px per frame; ``blurred.mp4`` the same, Gaussian-blurred;
  ``static.mp4`` its first frame held still; ``cuts_copy.mp4`` byte-identical to ``cuts.mp4``.
Each has a ``<stem>.json`` sidecar caption.
"""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction

import av
import numpy as np

W, H, FPS = 64, 48, 12
CUTS = (12, 24)
BARS = (4, 8, 56, 32)  # x, y, w, h of the picture inside the bars

CAPTIONS = {
    "cuts": "a red brick wall, then green leaves, then blue water waves",
    "bars": "an old film scene of a grey stone street in letterbox",
    "sharp": "a panning shot over a sharp field of orange flowers",
    "blurred": "a panning shot over a blurry field of orange flowers",
    "static": "a still shot of a field of orange flowers",
}


def texture(seed: int, h: int, w: int, tint=(1.0, 1.0, 1.0), lo: int = 60) -> np.ndarray:
    """A sharp random block texture (4x4 blocks), values in [lo, 255]."""
    rng = np.random.default_rng(seed)
    small = rng.integers(lo, 256, size=(h // 4 + 1, w // 4 + 1, 1)).astype(np.float32)
    img = np.repeat(np.repeat(small, 4, 0), 4, 1)[:h, :w] * np.array(tint, np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(path: str, frames: np.ndarray, fps: int = FPS, keyint: int = 250) -> None:
    with av.open(path, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "10", "preset": "ultrafast", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def pan(base: np.ndarray, n: int, step: int = 2, width: int = W) -> np.ndarray:
    return np.stack([np.roll(base, -i * step, axis=1)[:, :width] for i in range(n)])


def make_raw_videos(root: str, with_static_blur: bool = True) -> str:
    os.makedirs(root, exist_ok=True)
    tints = [(1.0, 0.4, 0.3), (0.3, 1.0, 0.4), (0.3, 0.5, 1.0)]
    scenes = [pan(texture(10 + k, H, W * 2, tints[k]), 12, step=1) for k in range(3)]
    encode(os.path.join(root, "cuts.mp4"), np.concatenate(scenes), keyint=12)
    pic = pan(texture(20, BARS[3], BARS[2] * 2), 24, step=1, width=BARS[2])
    framed = np.zeros((24, H, W, 3), np.uint8)
    x, y, w, h = BARS
    framed[:, y:y + h, x:x + w] = pic
    encode(os.path.join(root, "bars.mp4"), framed)
    if with_static_blur:
        import cv2

        sharp = pan(texture(30, H, W * 3, (1.0, 0.7, 0.3)), 24)
        encode(os.path.join(root, "sharp.mp4"), sharp)
        encode(os.path.join(root, "blurred.mp4"), np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in sharp]))
        encode(os.path.join(root, "static.mp4"), np.repeat(sharp[:1], 24, axis=0))
    for stem, cap in CAPTIONS.items():
        if os.path.exists(os.path.join(root, stem + ".mp4")):
            with open(os.path.join(root, stem + ".json"), "w") as f:
                json.dump({"caption": cap, "source_id": stem}, f)
    shutil.copyfile(os.path.join(root, "cuts.mp4"), os.path.join(root, "cuts_copy.mp4"))
    return root


def caption_hook(frames) -> dict:
    """A stand-in captioner (``--captioner _curate_media:caption_hook``) that also names the shot size."""
    return {"caption": f"captioned {len(frames)} frames", "shot_size": "close-up"}


def translate_hook(text: str, lang: str) -> str:
    return f"[{lang}] {text}"
