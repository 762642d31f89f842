"""Cutting clips out of a source file with PyAV.

Stream copy (no re-encoding, bit-exact packets) when the clip needs no crop, starts on a keyframe
and ends on a keyframe or at the end of the stream: the packets whose timestamps fall inside the
clip are remuxed with rebased timestamps. Otherwise the frames are decoded (after a seek to the
keyframe before the start), cropped and encoded with libx264 (mpeg4 when the bundled FFmpeg lacks it).
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Optional

import av


def stream_copy(path: str, start_pts: int, end_pts: Optional[int]) -> bytes:
    """Remux the video packets with ``start_pts <= pts < end_pts`` (end None: to the end) into mp4."""
    buf = io.BytesIO()
    with av.open(path) as src, av.open(buf, mode="w", format="mp4") as dst:
        vs = src.streams.video[0]
        out = dst.add_stream_from_template(vs)
        src.seek(start_pts, stream=vs, backward=True, any_frame=False)
        for pkt in src.demux(vs):
            if pkt.pts is None or pkt.size == 0:
                continue
            if pkt.pts < start_pts:
                continue
            if end_pts is not None and pkt.pts >= end_pts:
                if pkt.dts is not None and pkt.dts >= end_pts:
                    break
                continue
            pkt.pts -= start_pts
            if pkt.dts is not None:
                pkt.dts -= start_pts
            pkt.stream = out
            dst.mux(pkt)
    return buf.getvalue()


def reencode(path: str, start_pts: int, end_pts: Optional[int], crop: tuple[int, int, int, int], fps: float,
             crf: int = 18, preset: str = "veryfast") -> tuple[bytes, int]:
    """Decode frames with ``start_pts <= pts < end_pts``, crop to (x, y, w, h), encode. Returns (mp4, frames)."""
    x, y, w, h = crop
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    n = 0
    with av.open(path) as src, av.open(buf, mode="w", format="mp4") as dst:
        vs = src.streams.video[0]
        out = dst.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        out.width, out.height, out.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            out.options = {"crf": str(crf), "preset": preset}
        else:
            out.bit_rate = max(200_000, w * h * 8)
        src.seek(start_pts, stream=vs, backward=True, any_frame=False)
        for frame in src.decode(vs):
            if frame.pts is None or frame.pts < start_pts:
                continue
            if end_pts is not None and frame.pts >= end_pts:
                break
            img = frame.to_ndarray(format="rgb24")[y:y + h, x:x + w]
            for p in out.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                dst.mux(p)
            n += 1
        for p in out.encode():
            dst.mux(p)
    return buf.getvalue(), n
