"""Scene cuts and the clips they make.

PySceneDetect's content detector (HSV change between consecutive frames) sees every decoded frame,
downscaled; TransNetV2 (the ``transnetv2`` package and its weights) replaces it when both are
present. A scene shorter than ``min_clip_s`` is dropped; a longer one than ``max_clip_s`` is split
into equal parts.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import numpy as np

log = logging.getLogger("data_loaders.curate")

DETECT_WIDTH = 256  # frames are downscaled to this width for the content detector


class ContentCuts:
    """PySceneDetect ``ContentDetector`` fed frame by frame; :meth:`finish` returns the cut frames."""

    name = "pyscenedetect-content"
    size = None  # any size; the caller passes frames at most DETECT_WIDTH wide

    def __init__(self, fps: float, threshold: float, min_scene_frames: int):
        from scenedetect import ContentDetector
        from scenedetect.common import FrameTimecode

        self._tc = FrameTimecode
        self.fps = fps
        self.det = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames)
        self.cuts: list[int] = []

    def push(self, i: int, bgr: np.ndarray) -> None:
        self.cuts += [c.frame_num for c in self.det.process_frame(self._tc(i, fps=self.fps), bgr)]

    def finish(self, n: int) -> list[int]:
        if n and hasattr(self.det, "post_process"):
            self.cuts += [c.frame_num for c in self.det.post_process(self._tc(n - 1, fps=self.fps)) or []]
        return sorted({c for c in self.cuts if 0 < c < n})


class TransNetCuts:
    """TransNetV2 on 48x27 frames (its input size); cut = the first frame after a predicted transition."""

    name = "transnetv2"
    size = (48, 27)

    def __init__(self, weights: str):
        from transnetv2 import TransNetV2  # optional package

        self.model = TransNetV2(weights)
        self.frames: list[np.ndarray] = []

    def push(self, i: int, rgb_48x27: np.ndarray) -> None:
        self.frames.append(rgb_48x27)

    def finish(self, n: int) -> list[int]:
        if not self.frames:
            return []
        single, _ = self.model.predict_frames(np.stack(self.frames))
        scenes = self.model.predictions_to_scenes(np.asarray(single))
        return sorted({int(s[0]) for s in scenes if 0 < int(s[0]) < n})


def transnet_unavailable(weights: Optional[str]) -> Optional[str]:
    """Why TransNetV2 cannot run here (None when it can)."""
    try:
        import transnetv2  # noqa: F401
    except ImportError:
        return "the transnetv2 package is not installed"
    if not weights or not os.path.exists(weights):
        return f"no TransNetV2 weights (--transnet-weights, got {weights!r})"
    return None


def make_detector(kind: str, fps: float, threshold: float, min_scene_frames: int, weights: Optional[str]):
    if kind in ("auto", "transnetv2"):
        why = transnet_unavailable(weights)
        if why is None:
            return TransNetCuts(weights)  # type: ignore[arg-type]
        if kind == "transnetv2":
            log.warning("curate: TransNetV2 skipped (%s); using PySceneDetect", why)
    return ContentCuts(fps, threshold, min_scene_frames)


def clips_from_cuts(cuts: list[int], n_frames: int, fps: float, min_clip_s: float, max_clip_s: float
                    ) -> tuple[list[tuple[int, int]], int]:
    """Frame ranges ``[start, end)`` of the clips, and how many scenes were too short."""
    bounds = [0] + [c for c in cuts if 0 < c < n_frames] + [n_frames]
    clips: list[tuple[int, int]] = []
    too_short = 0
    min_f = max(1, math.ceil(min_clip_s * fps - 1e-6))
    max_f = max(min_f, int(max_clip_s * fps + 1e-6))
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n < min_f:
            too_short += 1
            continue
        parts = math.ceil(n / max_f)
        edges = [s + round(k * n / parts) for k in range(parts + 1)]
        clips += list(zip(edges[:-1], edges[1:]))
    return clips, too_short
