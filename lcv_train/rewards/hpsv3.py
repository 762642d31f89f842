"""``hpsv3``: HPSv3 (human preference score v3, a Qwen2-VL-7B image reward) applied per frame.

Weights, all local:
  ``path``       the published checkpoint, ``HPSv3.safetensors`` (MizzenAI/HPSv3), or the folder holding it:
                 the full reward model (Qwen2-VL weights + ``rm_head``), loaded strictly.
  ``base_path``  the Qwen2-VL-7B-Instruct folder: ``config.json``, tokenizer files and
                 ``preprocessor_config.json`` (its weights are not read; the checkpoint has them all).

Each of ``max_frames`` frames (evenly spread) is scored like an HPSv3 image: resized to 256 * 28 * 28
pixels, HPSv3's instruction with the prompt, the score read at ``<|Reward|>`` (the first of the head's
two outputs, the preference mean); the video's score is the mean over its frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lcv_train.errors import CheckpointError
from lcv_train.rewards._device import default_device, on_device
from lcv_train.rewards._loading import require_files
from lcv_train.rewards.base import VideoScorer, register_scorer
from lcv_train.rewards.clip import even_frames
from lcv_train.rewards.qwen2vl import (VisionSpec, build_inputs, build_model, current_layout,
                                       load_chat_template, load_strict, reward_head, to_patches)
from lcv_train.rewards.reward_prompts import HPSV3_INSTRUCTION, HPSV3_QUERY

REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28      # HPSv3 resizes every image to this area (min = max pixels)


def load_checkpoint_file(scorer: str, path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file of plain tensors (``weights_only``); ``{"model": ...}`` unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same message
            raise CheckpointError(f"{scorer}: cannot read {path}: {e}") from None
    return state.get("model", state) if isinstance(state, dict) else state


def tie_lm_head(model, state: dict[str, torch.Tensor]) -> None:
    """Checkpoints of tied-embedding models may leave lm_head out; it is the embedding then."""
    if "lm_head.weight" not in state and "lm_head.weight" in model.state_dict():
        emb = state.get("model.language_model.embed_tokens.weight")
        if emb is not None and model.config.get_text_config().tie_word_embeddings:
            state["lm_head.weight"] = emb


@register_scorer("hpsv3")
class HPSv3(VideoScorer):
    name = "hpsv3"

    def __init__(self, path: str | None = None, base_path: str | None = None, device: str | None = None,
                 max_frames: int = 4, dtype: str = "bfloat16", offload_when_idle: bool = True,
                 instruction: str = HPSV3_INSTRUCTION, batch_size: int = 8):
        from transformers import AutoConfig, AutoTokenizer

        ckpt = Path(path).expanduser() if path else None
        if ckpt is not None and ckpt.is_dir():
            ckpt = ckpt / "HPSv3.safetensors"
        if ckpt is None or not ckpt.is_file():
            raise CheckpointError(f"hpsv3: checkpoint {ckpt} not found "
                                  f"(hpsv3.path: HPSv3.safetensors from MizzenAI/HPSv3, or its folder)")
        base = require_files("hpsv3", base_path, ["config.json", "preprocessor_config.json"],
                             "Qwen2-VL-7B-Instruct base (hpsv3.base_path)")
        self.tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.chat_template = load_chat_template(self.tokenizer, base)
        self.spec = VisionSpec.from_folder("hpsv3", base)
        state = current_layout(load_checkpoint_file("hpsv3", ckpt))
        model = build_model(AutoConfig.from_pretrained(base), reward_head(state), getattr(torch, dtype))
        model.resize_token_embeddings(len(self.tokenizer))
        tie_lm_head(model, state)
        load_strict(model, state, ckpt)
        self.model = model.to(getattr(torch, dtype)).eval().requires_grad_(False)
        self.model.rm_head.float()
        self.device = default_device(device)
        self.max_frames, self.offload, self.batch_size = max_frames, offload_when_idle, batch_size
        self.instruction = instruction

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def prepare(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Images [N, 3, H, W] in [-1, 1] with one prompt each -> the model's inputs (CPU)."""
        patches, grids = zip(*(to_patches(img[None], self.spec, IMAGE_PIXELS, IMAGE_PIXELS) for img in images))
        texts = [self.instruction.format(text_prompt=p) + HPSV3_QUERY for p in prompts]
        inputs = build_inputs(self.tokenizer, self.chat_template, texts, "image", grids, self.spec.merge_size)
        inputs.update(pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids))
        return inputs

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[N] HPSv3 scores of images [N, 3, H, W] in [-1, 1]."""
        out = []
        with on_device(self.model, self.device, self.offload):
            dtype = next(self.model.model.visual.parameters()).dtype
            for i in range(0, len(images), self.batch_size):
                inputs = self.prepare(images[i:i + self.batch_size], prompts[i:i + self.batch_size])
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                out.append(self.model.reward(inputs, [self.reward_token_id])[:, 0, 0].cpu())
        return torch.cat(out)

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        B = videos.shape[0]
        idx = even_frames(videos.shape[2], self.max_frames)
        frames = videos[:, :, idx].permute(0, 2, 1, 3, 4).reshape(B * len(idx), 3, *videos.shape[-2:])
        per_frame = self.score_images(frames, [p for p in prompts for _ in idx])
        return per_frame.view(B, len(idx)).mean(1).float()
