"""``synthetic_compliance``: does a clip show what its synthetic-world caption says? (SPEC section 10)

The embedded default's captions name a colour, a shape and a direction of motion
(``data_loaders.synthetic``: the palette, the shapes, the motions and the caption grammar live there, and
only there). No weights: per frame the background is each row's median colour (plain and vertical-gradient
backgrounds are constant along a row, and the object never covers half a row), the object is the largest
8-connected blob of pixels far from it, and

* colour: the median colour of the object's pixels over all frames, nearest palette colour;
* shape: per frame whose blob does not touch the border, a triangle when under 40 % of its area lies in the
  top half of its bounding box (the triangles point up), else a square when it fills over 88 % of the box,
  else a circle; the majority over frames;
* motion: the least-squares velocity of the blob's centroid over the frames, nearest of the eight
  directions (a caption without motion wants a still object).

Each is 0/1 per video; the score (``compliance``) is their mean, so chance is (1/6 + 1/3 + 1/8) / 3 for
captions drawn like the set's. ``details`` adds ``found`` (fraction of frames with an object) and the
mean over frames of ``sharpness`` (variance of the Laplacian of luma in [0, 1]) and ``contrast`` (standard
deviation of luma); ``per_frame`` gives those two per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from data_loaders.synthetic import COLOURS, MOTIONS, SHAPES, parse_caption
from lcv_train.errors import ConfigError
from lcv_train.rewards.base import VideoScorer, register_scorer

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [K, 3], 0..255
_COLOUR_NAMES = list(COLOURS)
_DIRECTIONS = torch.tensor([[dx / math.hypot(dx, dy), dy / math.hypot(dx, dy)] for dx, dy in MOTIONS.values()])
_MOTION_NAMES = list(MOTIONS)


def _luma(rgb01: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> [..., H, W] (BT.601)."""
    return 0.299 * rgb01[..., 0, :, :] + 0.587 * rgb01[..., 1, :, :] + 0.114 * rgb01[..., 2, :, :]


def frame_quality(videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sharpness`` and ``contrast`` per frame, each [B, F], of videos [B, 3, F, H, W] in [-1, 1]."""
    x = (videos.detach().float().cpu().clamp(-1, 1) + 1) / 2
    y = _luma(x.permute(0, 2, 1, 3, 4))  # [B, F, H, W]
    B, Fr, H, W = y.shape
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    r = F.conv2d(F.pad(y.reshape(B * Fr, 1, H, W), (1, 1, 1, 1), mode="replicate"), lap).view(B, Fr, -1)
    return {"sharpness": r.var(dim=-1), "contrast": y.reshape(B, Fr, -1).std(dim=-1)}


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of each [N, H, W] bool mask (label propagation by max-pooling)."""
    N, H, W = mask.shape
    idx = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(N, H, W)
    labels = torch.where(mask, idx, torch.zeros(()))
    for _ in range(H * W):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
        grown = torch.where(mask, grown, torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(N, -1).long()
    counts = torch.zeros(N, H * W + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(dim=1)
    return (labels == best.view(N, 1, 1).float()) & mask


class SyntheticComplianceScorer(VideoScorer):
    """Caption compliance of synthetic-world clips: colour, shape and direction of motion (see the module)."""

    name = "compliance"

    def __init__(self, threshold: float = 45.0, min_area_fraction: float = 0.01, max_side: int = 64):
        self.threshold = float(threshold)  # RGB distance (0..255) from the background that counts as object
        self.min_area_fraction = float(min_area_fraction)  # smaller blobs are "no object in this frame"
        self.max_side = int(max_side)  # larger frames are averaged down to this first

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        return self.details(videos, prompts, fps)[self.name]

    def details(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict[str, torch.Tensor]:
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"synthetic_compliance: videos must be [B, 3, F, H, W], got {tuple(videos.shape)}")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"synthetic_compliance: {videos.shape[0]} videos but {len(prompts)} prompts")
        wanted = []
        for p in prompts:
            parsed = parse_caption(p)
            if parsed is None:
                raise ConfigError(f"synthetic_compliance: prompt {p!r} is not a synthetic-world caption "
                                  f"(\"a <colour> <shape> moves <direction> on a <background> background\")")
            wanted.append(parsed)
        seen = self.judge(videos)
        colour = torch.tensor([float(s["colour"] == w["colour"]) for s, w in zip(seen, wanted)])
        shape = torch.tensor([float(s["shape"] == w["shape"]) for s, w in zip(seen, wanted)])
        motion = torch.tensor([float(s["motion"] == w["motion"]) for s, w in zip(seen, wanted)])
        quality = frame_quality(videos)
        return {
            self.name: (colour + shape + motion) / 3,
            "colour": colour,
            "shape": shape,
            "motion": motion,
            "found": torch.tensor([s["found"] for s in seen]),
            "sharpness": quality["sharpness"].mean(dim=1),
            "contrast": quality["contrast"].mean(dim=1),
        }

    def per_frame(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        return frame_quality(videos)

    @torch.no_grad()
    def judge(self, videos: torch.Tensor) -> list[dict]:
        """What each clip shows: ``{"colour", "shape", "motion", "found"}`` (None where nothing was found)."""
        x = (videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # [B, 3, F, H, W], 0..255
        B, _, Fr, H, W = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, 3, H, W)
        if max(H, W) > self.max_side:
            scale = self.max_side / max(H, W)
            H, W = max(1, round(H * scale)), max(1, round(W * scale))
            x = F.adaptive_avg_pool2d(x, (H, W))
        background = x.median(dim=3, keepdim=True).values  # per row
        far = (x - background).norm(dim=1) > self.threshold  # [N, H, W]
        blob = _largest_blob(far)
        area = blob.sum(dim=(1, 2)).float()
        found = area >= max(1.0, self.min_area_fraction * H * W)
        rows = torch.arange(H, dtype=torch.float32).view(1, H, 1) + 0.5
        cols = torch.arange(W, dtype=torch.float32).view(1, 1, W) + 0.5
        safe = area.clamp(min=1)
        cy = (blob * rows).sum(dim=(1, 2)) / safe
        cx = (blob * cols).sum(dim=(1, 2)) / safe
        big = torch.tensor(1e9)
        top = torch.where(blob, rows, big).amin(dim=(1, 2))
        bottom = torch.where(blob, rows, -big).amax(dim=(1, 2))
        left = torch.where(blob, cols, big).amin(dim=(1, 2))
        right = torch.where(blob, cols, -big).amax(dim=(1, 2))
        box = (bottom - top + 1) * (right - left + 1)
        fill = area / box.clamp(min=1)
        upper = (blob & (rows < (top + bottom).view(-1, 1, 1) / 2)).sum(dim=(1, 2)).float() / safe
        inside = (top > 1) & (left > 1) & (bottom < H - 1) & (right < W - 1)
        kind = torch.where(upper < 0.4, 2, torch.where(fill > 0.88, 1, 0))  # SHAPES: circle, square, triangle

        out = []
        for b in range(B):
            sl = slice(b * Fr, (b + 1) * Fr)
            f_found = found[sl]
            n = int(f_found.sum())
            if n == 0:
                out.append({"colour": None, "shape": None, "motion": None, "found": 0.0})
                continue
            pixels = x[sl].permute(0, 2, 3, 1)[blob[sl] & f_found.view(-1, 1, 1)]  # [P, 3]
            colour = _COLOUR_NAMES[int((pixels.median(dim=0).values - _PALETTE).norm(dim=1).argmin())]
            use = f_found & inside[sl]
            if not bool(use.any()):
                use = f_found
            shape = SHAPES[int(torch.bincount(kind[sl][use], minlength=len(SHAPES)).argmax())]
            out.append({"colour": colour, "shape": shape, "motion": self._direction(cx[sl], cy[sl], f_found, H, W),
                        "found": n / Fr})
        return out

    @staticmethod
    def _direction(cx: torch.Tensor, cy: torch.Tensor, found: torch.Tensor, H: int, W: int) -> str | None:
        """The nearest of the eight directions to the centroid's least-squares velocity; "" when still."""
        t = torch.arange(len(cx), dtype=torch.float32)[found]
        if len(t) < 2:
            return ""
        t = t - t.mean()
        v = torch.stack([(t * cx[found]).sum(), (t * cy[found]).sum()]) / (t * t).sum()
        travel = float(v.norm()) * (len(cx) - 1)  # pixels over the clip
        if travel < 0.05 * min(H, W):
            return ""
        return _MOTION_NAMES[int((_DIRECTIONS @ (v / v.norm())).argmax())]


@register_scorer("synthetic_compliance")
def _build(**kwargs) -> SyntheticComplianceScorer:
    return SyntheticComplianceScorer(**kwargs)
