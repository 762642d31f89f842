"""``clip``: CLIP text-video alignment, the mean over frames of the cosine similarity of frame and prompt.

Weights: any CLIP checkpoint folder in the transformers layout (``config.json``, weights, tokenizer
files, ``preprocessor_config.json``), e.g. a local copy of openai/clip-vit-large-patch14; nothing is
downloaded. Frames are preprocessed here as CLIP's image processor does (shortest side to the crop size,
bicubic, centre crop, the checkpoint's mean/std), so no torchvision is needed. ``max_frames`` frames are
taken evenly over the clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lcv_train.rewards._device import default_device, on_device
from lcv_train.rewards._loading import embedding_of, read_json, require_files
from lcv_train.rewards.base import VideoScorer, register_scorer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def even_frames(num_frames: int, count: int) -> torch.Tensor:
    """``count`` frame indices spread evenly over ``num_frames`` (all of them when there are fewer)."""
    if num_frames <= count:
        return torch.arange(num_frames)
    return torch.linspace(0, num_frames - 1, count).round().long()


@register_scorer("clip")
class CLIPAlignment(VideoScorer):
    name = "clip"

    def __init__(self, path: str | None = None, device: str | None = None, max_frames: int = 8,
                 offload_when_idle: bool = True, batch_frames: int = 64):
        from transformers import AutoTokenizer, CLIPModel

        folder = require_files("clip", path, ["config.json", "preprocessor_config.json"], "CLIP model")
        self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        pre = read_json("clip", folder / "preprocessor_config.json")
        crop = pre.get("crop_size", self.model.config.vision_config.image_size)
        self.size = crop["height"] if isinstance(crop, dict) else int(crop)
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD)).view(1, 3, 1, 1)
        self.device = default_device(device)
        self.max_frames, self.offload, self.batch_frames = max_frames, offload_when_idle, batch_frames

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> CLIP pixel values [N, 3, size, size]."""
        x = (frames.float() + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        B, _, Fn = videos.shape[:3]
        idx = even_frames(Fn, self.max_frames)
        frames = videos[:, :, idx].permute(0, 2, 1, 3, 4).reshape(B * len(idx), 3, *videos.shape[-2:])
        pixels = self.preprocess(frames)
        text = self.tokenizer(list(prompts), padding=True, truncation=True,
                              max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        with on_device(self.model, self.device, self.offload):
            dtype = next(self.model.parameters()).dtype
            img = torch.cat([embedding_of(self.model.get_image_features(
                pixel_values=pixels[i:i + self.batch_frames].to(self.device, dtype)))
                for i in range(0, len(pixels), self.batch_frames)])
            txt = embedding_of(self.model.get_text_features(**{k: v.to(self.device) for k, v in text.items()}))
        img = F.normalize(img.float(), dim=-1).view(B, len(idx), -1)
        txt = F.normalize(txt.float(), dim=-1)
        return (img * txt[:, None]).sum(-1).mean(1).cpu()
