"""Quality signals and weights-free attributes computed on the sampled analysis frames of a clip.

- ``blur``: variance of the Laplacian of the luma (higher = sharper; a blurred copy scores lower).
- ``motion``: mean Farneback optical-flow magnitude between consecutive sampled frames, in frame
  diagonals per second (so it does not depend on resolution or sampling rate).
- ``camera_motion``: static / pan left|right / tilt up|down / zoom in|out / complex, from the mean
  flow vector and the mean radial flow (divergence) when they explain most of the motion.
- ``colour_tone`` (warm, cool, neutral, monochrome) and ``brightness`` (dark, normal, bright).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

STATIC_MOTION = 0.01  # frame diagonals per second below which a clip counts as static


def _cv2():
    import cv2

    cv2.setNumThreads(1)  # one core per worker: the pool gives the parallelism
    return cv2


def to_gray(rgb: np.ndarray) -> np.ndarray:
    return _cv2().cvtColor(rgb, _cv2().COLOR_RGB2GRAY)


def blur_score(gray: np.ndarray) -> float:
    cv2 = _cv2()
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def flow_stats(prev: np.ndarray, nxt: np.ndarray, dt: float) -> tuple[float, float, float, float]:
    """(mean magnitude, mean dx, mean dy, mean radial component) of the flow, in diagonals per second."""
    cv2 = _cv2()
    flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    h, w = prev.shape
    scale = 1.0 / (math.hypot(h, w) * max(dt, 1e-6))
    mag = np.hypot(flow[..., 0], flow[..., 1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rx, ry = xx - (w - 1) / 2, yy - (h - 1) / 2
    rn = np.hypot(rx, ry) + 1e-6
    radial = (flow[..., 0] * rx + flow[..., 1] * ry) / rn
    return (float(mag.mean()) * scale, float(flow[..., 0].mean()) * scale, float(flow[..., 1].mean()) * scale,
            float(radial.mean()) * scale)


def camera_motion(stats: Sequence[tuple[float, float, float, float]]) -> str:
    if not stats:
        return "unknown"
    mag, dx, dy, rad = (float(np.mean([s[i] for s in stats])) for i in range(4))
    if mag < STATIC_MOTION:
        return "static"
    # content moving right = camera panning left; content moving down = camera tilting up
    if abs(rad) > 0.5 * mag and abs(rad) > max(abs(dx), abs(dy)):
        return "zoom in" if rad > 0 else "zoom out"
    if abs(dx) > 0.5 * mag and abs(dx) >= abs(dy):
        return "pan left" if dx > 0 else "pan right"
    if abs(dy) > 0.5 * mag:
        return "tilt up" if dy > 0 else "tilt down"
    return "complex"


def colour_attributes(rgbs: Sequence[np.ndarray]) -> dict[str, str]:
    cv2 = _cv2()
    hsv = np.concatenate([cv2.cvtColor(f, cv2.COLOR_RGB2HSV).reshape(-1, 3) for f in rgbs]).astype(np.float32)
    h, s, v = hsv[:, 0] * 2.0, hsv[:, 1] / 255.0, hsv[:, 2] / 255.0  # OpenCV hue is 0..180
    brightness = "dark" if v.mean() < 0.25 else "bright" if v.mean() > 0.7 else "normal"
    coloured = s > 0.2
    if coloured.mean() < 0.1:
        return {"colour_tone": "monochrome", "brightness": brightness}
    hc = h[coloured]
    warm = float(((hc < 70) | (hc >= 330)).mean())
    cool = float(((hc >= 150) & (hc < 270)).mean())
    tone = "warm" if warm > 0.5 else "cool" if cool > 0.5 else "neutral"
    return {"colour_tone": tone, "brightness": brightness}
