"""Black-border detection, the equivalent of ffmpeg's cropdetect on decoded frames.

For each sampled frame the brightest luma value of every row and column is kept; over a clip a row
(column) is border when its brightest value never exceeds ``limit`` (cropdetect's default 24 of 255).
The crop is the box of the non-border rows and columns, shrunk to even offsets and sizes (4:2:0 video).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def border_profile(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightest value per row and per column of one luma frame [H, W]."""
    return gray.max(axis=1), gray.max(axis=0)


def detect_crop(rows: Sequence[np.ndarray], cols: Sequence[np.ndarray], limit: int = 24
                ) -> Optional[tuple[int, int, int, int]]:
    """(x, y, w, h) of the picture inside the borders; None when every sampled frame is black."""
    rmax = np.max(np.stack(rows), axis=0)
    cmax = np.max(np.stack(cols), axis=0)
    rv, cv = np.flatnonzero(rmax > limit), np.flatnonzero(cmax > limit)
    if rv.size == 0 or cv.size == 0:
        return None
    y0, y1 = int(rv[0]), int(rv[-1]) + 1
    x0, x1 = int(cv[0]), int(cv[-1]) + 1
    y0, x0 = y0 + (y0 & 1), x0 + (x0 & 1)
    h, w = (y1 - y0) & ~1, (x1 - x0) & ~1
    if h < 2 or w < 2:
        return None
    return x0, y0, w, h
