"""The synthetic moving-shapes set, written as real shards (real mp4 through PyAV).

Each clip: one coloured shape (circle, square, triangle) moving in one of eight directions over a
plain or gradient background; the caption says colour, shape, motion and background, e.g. "a red
circle moves to the right on a dark blue background". Optionally some still images (1-frame, jpg):
"a red circle on a dark blue background". Small enough to generate in seconds at 32x32.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from data_loaders.decode import encode_jpg, encode_mp4
from data_loaders.shards import INDEX_NAME, ShardSetWriter

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "dark blue": (10, 20, 80),
    "gray": (110, 110, 110),
    "dark green": (10, 60, 20),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {
    "to the right": (1, 0),
    "to the left": (-1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "diagonally up and to the right": (1, -1),
    "diagonally up and to the left": (-1, -1),
    "diagonally down and to the right": (1, 1),
    "diagonally down and to the left": (-1, 1),
}


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # triangle pointing up: inside when below the two slanted edges and above the base
    top, base = cy - r, cy + r * 0.8
    half = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def _background(name: str, gradient: bool, h: int, w: int) -> np.ndarray:
    c = np.array(BACKGROUNDS[name], np.float32)
    img = np.broadcast_to(c, (h, w, 3)).copy()
    if gradient:
        ramp = np.linspace(1.6, 0.4, h, dtype=np.float32)[:, None, None]
        img = np.clip(img * ramp + 8 * ramp, 0, 255)
    return img


def make_caption(colour: str, shape: str, motion: str, background: str, gradient: bool) -> str:
    """The caption grammar: "a <colour> <shape> moves <motion> on a <background> [gradient ]background";
    a still image (``motion`` empty) drops "moves <motion>". ``parse_caption`` reads it back."""
    where = f"a {background} gradient background" if gradient else f"a {background} background"
    return f"a {colour} {shape} moves {motion} on {where}" if motion else f"a {colour} {shape} on {where}"


def parse_caption(caption: str) -> Optional[dict[str, str]]:
    """``{"colour", "shape", "motion"}`` of a caption in ``make_caption``'s grammar (motion "" for a still),
    or None when the caption does not follow it. The background part is not needed and not checked."""
    words = caption.strip().lower().split(" on a ", 1)[0].split(" ")
    if len(words) < 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        return None
    if len(words) == 3:
        return {"colour": words[1], "shape": words[2], "motion": ""}
    motion = " ".join(words[4:])
    if words[3] != "moves" or motion not in MOTIONS:
        return None
    return {"colour": words[1], "shape": words[2], "motion": motion}


def make_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 [F,H,W,3] and its attributes (caption included)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    gradient = bool(rng.random() < 0.3)
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))] if frames > 1 else ""
    dx, dy = MOTIONS[motion] if motion else (0, 0)
    s = min(height, width)
    r = s * float(rng.uniform(0.14, 0.22))
    travel = s * float(rng.uniform(0.35, 0.55))
    cx0 = width / 2 - dx * travel / 2 + float(rng.uniform(-0.08, 0.08)) * width
    cy0 = height / 2 - dy * travel / 2 + float(rng.uniform(-0.08, 0.08)) * height
    bg_img = _background(bg, gradient, height, width)
    col = np.array(COLOURS[colour], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        a = i / max(1, frames - 1)
        m = _shape_mask(shape, height, width, cx0 + dx * travel * a, cy0 + dy * travel * a, r)
        img = bg_img.copy()
        img[m] = col
        out[i] = img.astype(np.uint8)
    caption = make_caption(colour, shape, motion, bg, gradient)
    speed = travel / max(1, frames - 1) / s
    attrs = {
        "caption": caption,
        "shape": shape,
        "colour": colour,
        "motion_direction": motion or "none",
        "background": bg,
        "gradient": gradient,
        "motion": round(speed, 5),
        "aesthetic": round(float(rng.uniform(3.0, 7.0)), 3),
        "text_coverage": 0.0,
    }
    return out, attrs


def synthetic_captions(n: int, seed: int, still: bool = False, colours: Sequence[str] | None = None) -> list[str]:
    """``n`` captions drawn like the set's clips (``make_clip`` from ``np.random.default_rng(seed)``), of still
    images (no motion) when ``still``, keeping only objects of ``colours`` when given: prompts for GRPO and
    evaluation that follow the set's grammar."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        caption = make_clip(rng, 1 if still else 2, 16, 16)[1]["caption"]
        if not colours or parse_caption(caption)["colour"] in colours:
            out.append(caption)
    return out


def iter_synthetic(
    n: int,
    frames: int | Sequence[int],
    height: int,
    width: int,
    fps: float,
    seed: int,
    image_fraction: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Shard samples ``{"__key__", "mp4"|"jpg", "json"}`` of the synthetic set."""
    lo, hi = (frames, frames) if isinstance(frames, int) else (int(frames[0]), int(frames[1]))
    rng = np.random.default_rng(seed)
    for i in range(n):
        is_image = rng.random() < image_fraction
        f = 1 if is_image else int(rng.integers(lo, hi + 1))
        clip, attrs = make_clip(rng, f, height, width)
        meta = {
            "key": f"syn{i:07d}",
            **attrs,
            "width": width,
            "height": height,
            "subset": "image" if is_image else "video",
        }
        if is_image:
            yield {"__key__": meta["key"], "jpg": encode_jpg(clip[0]), "json": meta}
        else:
            meta.update(num_frames=f, fps=float(fps), duration=f / float(fps))
            yield {"__key__": meta["key"], "mp4": encode_mp4(clip, fps), "json": meta}


def write_synthetic_shards(out_dir: str, n: int, frames, height: int, width: int, fps: float, seed: int,
                           image_fraction: float = 0.0, samples_per_shard: int = 256, params: Optional[dict] = None) -> str:
    w = ShardSetWriter(out_dir, "pixel", shard_size="1GB", max_count=samples_per_shard, extra={"synthetic": params or {}})
    for smp in iter_synthetic(n, frames, height, width, fps, seed, image_fraction):
        w.write(smp)
    return w.finish()


def _read_params(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, INDEX_NAME)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index.get("synthetic") if index.get("complete") else None


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_command(out: str, frames: Sequence[int], height: int, width: int, fps: float,
                  image_fraction: float = 0.0) -> str:
    """The one ``lcv-train`` line that trains on a set ``lcv-data synth`` wrote to ``out``.

    It is the embedded default's data config (``conf/data/synthetic.yaml``) with ``data.shards`` pointing at
    the set (given shards, the trainer makes no synthetic set of its own); the bucket and fps are added only
    where the set differs from that config's, so a set made with ``synth``'s defaults needs nothing more.
    """
    import yaml

    import conf

    default = yaml.safe_load((Path(conf.__file__).parent / "data" / "synthetic.yaml").read_text())["data"]
    shortest = int(min(frames))
    f = 1 + 4 * ((shortest - 1) // 4)  # 1 + 4k frames: fits the Wan VAE's temporal stride as well
    buckets = [[f, int(height), int(width)]] if shortest > 1 else []
    if image_fraction > 0 or not buckets:
        buckets.append([1, int(height), int(width)])
    line = f"lcv-train data.shards=[{out}]"
    if buckets != [list(b) for b in default["buckets"]]:
        line += " data.buckets=[" + ",".join(f"[{a},{b},{c}]" for a, b, c in buckets) + "]"
    if float(fps) != float(default["fps"]):
        line += f" data.fps={fps:g}"
    return line


def ensure_synthetic_shards(
    out_dir: str,
    n: int = 500,
    frames: int | Sequence[int] = (8, 16),
    height: int = 32,
    width: int = 32,
    fps: float = 8.0,
    seed: int = 0,
    *,
    image_fraction: float = 0.0,
    samples_per_shard: int = 256,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    timeout: float = 600.0,
) -> str:
    """Make sure ``out_dir`` holds the synthetic set with these parameters; return ``out_dir``.

    Idempotent: nothing is written when ``out_dir/index.json`` is complete and records the same
    parameters. Atomic: the set is written to a temporary sibling directory and renamed into place.
    Safe with many processes: with ``rank`` given, rank 0 writes and the others wait for the index;
    without it, a file lock next to ``out_dir`` lets exactly one process write (single host).
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    fr = [int(frames), int(frames)] if isinstance(frames, int) else [int(frames[0]), int(frames[1])]
    params = {"n": int(n), "frames": fr, "height": int(height), "width": int(width), "fps": float(fps),
              "seed": int(seed), "image_fraction": float(image_fraction), "samples_per_shard": int(samples_per_shard)}
    if _read_params(out_dir) == params:
        return out_dir
    if rank is not None and rank != 0:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _read_params(out_dir) == params:
                return out_dir
            time.sleep(0.2)
        raise TimeoutError(f"rank {rank}: waited {timeout:.0f}s for rank 0 to write synthetic shards in {out_dir}")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(out_dir + ".lock"):
        if _read_params(out_dir) == params:
            return out_dir
        tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write_synthetic_shards(tmp, n, fr, height, width, fps, seed, image_fraction, samples_per_shard, params)
            if os.path.exists(out_dir):
                old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
