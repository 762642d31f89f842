"""One decoding pass over a source file: everything the per-clip steps need, in bounded memory.

Every frame goes (downscaled) to the scene detector; every ``fps / sample_fps``-th frame is kept as a
sample: an RGB copy at most ``analysis_size`` pixels on its long side (blur, motion, attributes,
scorers, captioner) and the brightest value of each full-resolution luma row and column (borders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_loaders.curate.crop import border_profile
from data_loaders.curate.scenes import DETECT_WIDTH, make_detector


@dataclass
class Sample:
    index: int  # frame index in the source
    rgb: np.ndarray  # [h, w, 3] uint8 at analysis size
    rows: np.ndarray  # brightest luma per full-resolution row
    cols: np.ndarray


@dataclass
class Analysis:
    width: int
    height: int
    fps: float
    pts: list[int] = field(default_factory=list)
    keyframe: list[bool] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    detector: str = ""
    scale: float = 1.0  # analysis size / source size

    @property
    def n(self) -> int:
        return len(self.pts)


def _even(v: float) -> int:
    return max(2, int(round(v / 2)) * 2)


def analyse(path: str, fps: float, detect: bool, sample_fps: float, analysis_size: int, scene_detector: str = "auto",
            threshold: float = 27.0, min_scene_frames: int = 3, transnet_weights: Optional[str] = None) -> Analysis:
    import av

    with av.open(path) as c:
        vs = c.streams.video[0]
        w, h = int(vs.codec_context.width), int(vs.codec_context.height)
        scale = min(1.0, analysis_size / max(w, h))
        aw, ah = (w, h) if scale == 1.0 else (_even(w * scale), _even(h * scale))
        out = Analysis(width=w, height=h, fps=fps, scale=aw / w)
        det = make_detector(scene_detector, fps, threshold, min_scene_frames, transnet_weights) if detect else None
        if det is not None:
            out.detector = det.name
            dw, dh = det.size or ((w, h) if w <= DETECT_WIDTH else (DETECT_WIDTH, _even(h * DETECT_WIDTH / w)))
            dfmt = "bgr24" if det.size is None else "rgb24"
        every = max(1, int(round(fps / sample_fps)))
        for i, frame in enumerate(c.decode(vs)):
            out.pts.append(int(frame.pts if frame.pts is not None else i))
            out.keyframe.append(bool(frame.key_frame))
            if det is not None:
                det.push(i, frame.to_ndarray(width=dw, height=dh, format=dfmt))
            if i % every == 0:
                rows, cols = border_profile(frame.to_ndarray(format="gray"))
                rgb = frame.to_ndarray(format="rgb24") if scale == 1.0 else frame.to_ndarray(width=aw, height=ah, format="rgb24")
                out.samples.append(Sample(i, rgb, rows, cols))
        if det is not None:
            out.cuts = det.finish(out.n)
    return out
