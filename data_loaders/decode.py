"""Decoding media into bucket-shaped uint8 arrays: video with PyAV, images with Pillow.

Frames are taken at the target fps (nearest earlier source frame for each target time), resized so
the bucket is covered (aspect kept) and center-cropped to the bucket. Output: uint8 ``[F, H, W, 3]``.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Optional

import av
import numpy as np


class DecodeError(Exception):
    """The media bytes could not be turned into the requested frames."""


def video_to_float(video):
    """A batch's uint8 ``video [B, 3, F, H, W]`` (0..255) -> float32 in [-1, 1], what the codecs encode.

    The loader hands out uint8 (a quarter of float32's bytes through worker shared memory, pinning and the
    host-to-device copy); call this after moving the batch to its device."""
    import torch

    if video.dtype != torch.uint8:
        raise TypeError(f"video must be the loader's uint8 frames, got {video.dtype}")
    return video.float().mul_(1.0 / 127.5).sub_(1.0)


def _cover_size(w: int, h: int, out_w: int, out_h: int) -> tuple[int, int]:
    scale = max(out_w / w, out_h / h)
    return max(out_w, int(math.ceil(w * scale - 1e-6))), max(out_h, int(math.ceil(h * scale - 1e-6)))


def _crop(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    y0 = (a.shape[0] - out_h) // 2
    x0 = (a.shape[1] - out_w) // 2
    return a[y0 : y0 + out_h, x0 : x0 + out_w]


def probe_video(data: bytes) -> dict[str, Any]:
    """width, height, fps, num_frames, duration of a video (counting frames by demuxing if needed)."""
    try:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            fps = float(rate) if rate else 0.0
            n = int(s.frames or 0)
            if n <= 0:
                n = sum(1 for p in c.demux(s) if p.size)
            if fps <= 0 and s.duration and s.time_base:
                fps = n / float(s.duration * s.time_base)
            w, h = s.codec_context.width, s.codec_context.height
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    if n <= 0 or fps <= 0 or not w or not h:
        raise DecodeError(f"no decodable video stream (frames={n}, fps={fps}, size={w}x{h})")
    return {"width": w, "height": h, "fps": fps, "num_frames": n, "duration": n / fps}


def available_frames(duration: float, fps: float) -> int:
    """How many frames at ``fps`` fit in ``duration`` seconds (sampling times 0, 1/fps, ...)."""
    return max(0, int(math.ceil(duration * fps - 1e-6)))


def decode_video(data: bytes, frames: int, height: int, width: int, fps: float, start: float = 0.0,
                 sink: Optional[Callable[[int, np.ndarray], None]] = None) -> Optional[np.ndarray]:
    """``frames`` frames at ``fps`` from ``start`` seconds, resized + center-cropped: uint8 [F,H,W,3].

    With ``sink``, each frame is handed over as ``sink(index, uint8 [H,W,3])`` as soon as it is ready
    (no full-clip array is built) and None is returned.
    """
    times = start + np.arange(frames) / fps
    out: list[np.ndarray | None] = [None] * frames

    def put(j: int, arr: np.ndarray) -> None:
        if sink is not None:
            sink(j, arr)
        else:
            out[j] = arr

    try:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            src_w, src_h = s.codec_context.width, s.codec_context.height
            if not src_w or not src_h:
                raise DecodeError("video stream has no size")
            rw, rh = _cover_size(src_w, src_h, width, height)
            interp = "AREA" if rw < src_w else "BICUBIC"
            if start > 0 and s.time_base:
                c.seek(int(start / s.time_base), stream=s, backward=True, any_frame=False)
            rate = float(s.average_rate or 0) or None

            def convert(fr) -> np.ndarray:
                a = fr.reformat(width=rw, height=rh, format="rgb24", interpolation=interp).to_ndarray()
                return _crop(a, height, width)

            j = 0
            prev = None
            prev_arr = None
            for i, fr in enumerate(c.decode(s)):
                t = fr.time
                if t is None:
                    t = i / rate if rate else i / fps
                while j < frames and times[j] < t - 1e-6:
                    if prev is None:  # target time before the first frame after the seek
                        prev = fr
                    if prev_arr is None:
                        prev_arr = convert(prev)
                    put(j, prev_arr)
                    j += 1
                if prev is not fr:
                    prev, prev_arr = fr, None
                if j >= frames:
                    break
            if prev is not None and j < frames:
                # The last decoded frame covers the times after it (it lasts one source frame).
                last_t = prev.time if prev.time is not None else 0.0
                span = 1.0 / rate if rate else 1.0 / fps
                arr = prev_arr if prev_arr is not None else convert(prev)
                while j < frames and times[j] < last_t + span - 1e-6:
                    put(j, arr)
                    j += 1
    except DecodeError:
        raise
    except (av.FFmpegError, IndexError, ValueError, MemoryError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    if j < frames:
        raise DecodeError(f"only {j} of {frames} frames at {fps} fps from t={start:.3f}s")
    return None if sink is not None else np.stack(out)  # type: ignore[arg-type]


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """An image as a 1-frame video: uint8 [1,H,W,3]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            rw, rh = _cover_size(im.width, im.height, width, height)
            im = im.resize((rw, rh), Image.Resampling.BICUBIC if rw >= im.width else Image.Resampling.BOX)
            a = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    return _crop(a, height, width)[None]


def probe_image(data: bytes) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return {"width": im.width, "height": im.height, "num_frames": 1}
    except (UnidentifiedImageError, OSError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def encode_mp4(frames: np.ndarray, fps: float, codec: str | None = None, crf: int = 12, preset: str = "ultrafast") -> bytes:
    """uint8 [F,H,W,3] -> mp4 bytes (libx264 when the bundled FFmpeg has it, else mpeg4)."""
    f, h, w, _ = frames.shape
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        from fractions import Fraction

        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": preset, "crf": str(crf)}
        else:
            s.bit_rate = max(200_000, w * h * 8)
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def encode_jpg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
