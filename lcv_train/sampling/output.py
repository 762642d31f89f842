"""Writing samples: an mp4 per video and a PNG frame strip (a few frames side by side) to look at."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> uint8 ``[F, H, W, 3]``."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def frame_strip(frames: np.ndarray, count: int = 8) -> np.ndarray:
    """``count`` evenly spaced frames (all of them if fewer) side by side, 2 px apart: uint8 ``[H, W', 3]``."""
    n = frames.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    h = frames.shape[1]
    gap = np.full((h, 2, 3), 255, np.uint8)
    parts = []
    for i in idx:
        parts += [frames[i], gap]
    return np.concatenate(parts[:-1], axis=1)


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "sample"


def write_video(video: torch.Tensor, out_dir: Path, name: str, fps: float, caption: str = "") -> Path:
    """``video [3, F, H, W]`` -> ``out_dir/name.mp4``, ``name.png`` (the frame strip) and ``name.txt``."""
    from PIL import Image

    from data_loaders.decode import encode_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = out_dir / f"{name}.mp4"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_mp4(frames, fps=fps))
    tmp.replace(path)
    Image.fromarray(frame_strip(frames)).save(out_dir / f"{name}.png")
    (out_dir / f"{name}.txt").write_text(caption + "\n")
    return path
