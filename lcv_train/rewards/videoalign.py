"""``videoalign``: VideoAlign's VideoReward (a Qwen2-VL-2B video reward): visual quality (VQ), motion
quality (MQ) and text alignment (TA) of a whole clip, sampled at 2 fps.

Weights, all local:
  ``path``       the published VideoReward folder (KwaiVGI/VideoReward): ``model_config.json`` and
                 ``checkpoint-<step>/`` holding either ``model.pth`` (the full model) or
                 ``adapter_model.safetensors`` + ``non_lora_state_dict.pth`` (LoRA on the language model
                 + the trained non-LoRA weights: reward head, new token embeddings); the latest step unless
                 ``checkpoint_step`` is given.
  ``base_path``  the Qwen2-VL-2B-Instruct folder (config, weights, tokenizer, ``preprocessor_config.json``).

The clip is sampled at ``data_config.fps`` (2) of its ``fps`` (an even number of frames, at least 4 when
the clip has them), each frame resized within ``data_config.max_frame_pixels``; the prompt is the
published ``detailed_special`` template, the three scores read at ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` and normalised with the checkpoint's ``inference_config`` means and stds. The score is
the sum over ``dims`` (default MQ + TA, SPEC section 6); ``details`` gives all three.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from lcv_train.errors import CheckpointError, ConfigError
from lcv_train.rewards._device import default_device, on_device
from lcv_train.rewards._loading import read_json, require_files
from lcv_train.rewards.base import VideoScorer, register_scorer
from lcv_train.rewards.hpsv3 import load_checkpoint_file, tie_lm_head
from lcv_train.rewards.qwen2vl import (VisionSpec, build_inputs, build_model, current_layout,
                                       load_chat_template, load_strict, merge_lora, to_patches)
from lcv_train.rewards.reward_prompts import VIDEOALIGN_TEMPLATE

DIMS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
MIN_FRAME_PIXELS = 128 * 28 * 28   # Qwen2-VL's smallest video frame


def sample_indices(num_frames: int, fps: float, target_fps: float, factor: int = 2,
                   min_frames: int = 4) -> torch.Tensor:
    """Frame indices for ``target_fps``: a multiple of ``factor`` frames, at least ``min_frames`` when the clip
    has them, evenly spread from the first frame to the last."""
    n = round(num_frames / fps * target_fps / factor) * factor
    most = max(factor, num_frames // factor * factor)
    n = min(max(n, math.ceil(min_frames / factor) * factor), most)
    return torch.linspace(0, num_frames - 1, n).round().long()


def read_safetensors_folder(scorer: str, folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the (sharded) safetensors in ``folder``, keys in the current layout."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{scorer}: {folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return current_layout(state)


def find_checkpoint(folder: Path, step: int | None) -> Path:
    steps = {int(m.group(1)): p for p in folder.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    if not steps:
        raise CheckpointError(f"videoalign: {folder} has no checkpoint-<step>/ folder")
    if step is not None and step not in steps:
        raise CheckpointError(f"videoalign: {folder}/checkpoint-{step} not found (have {sorted(steps)})")
    return steps[step if step is not None else max(steps)]


@register_scorer("videoalign")
class VideoAlign(VideoScorer):
    name = "videoalign"

    def __init__(self, path: str | None = None, base_path: str | None = None, device: str | None = None,
                 dims: Sequence[str] = ("MQ", "TA"), normalize: bool = True, checkpoint_step: int | None = None,
                 dtype: str = "bfloat16", offload_when_idle: bool = True, template: str = VIDEOALIGN_TEMPLATE,
                 min_frame_pixels: int = MIN_FRAME_PIXELS):
        from transformers import AutoTokenizer

        bad = [d for d in dims if d not in DIMS]
        if bad or not dims:
            raise ConfigError(f"videoalign.dims: {list(dims)} must be a non-empty subset of {list(DIMS)}")
        folder = require_files("videoalign", path, ["model_config.json"], "VideoReward (videoalign.path)")
        cfg = read_json("videoalign", folder / "model_config.json")
        self.data_cfg, self.infer_cfg = cfg.get("data_config", {}), cfg.get("inference_config") or {}
        lora_cfg = cfg.get("peft_lora_config", {})
        ckpt = find_checkpoint(folder, checkpoint_step)
        full = ckpt / "model.pth"
        if not full.exists():
            require_files("videoalign", ckpt, ["adapter_model.safetensors", "non_lora_state_dict.pth"],
                          "LoRA checkpoint (or model.pth)")
        base = require_files("videoalign", base_path, ["config.json", "preprocessor_config.json"],
                             "Qwen2-VL-2B-Instruct base (videoalign.base_path)")
        self.tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        self.tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
        self.token_ids = self.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        self.chat_template = load_chat_template(self.tokenizer, base)
        self.spec = VisionSpec.from_folder("videoalign", base)
        from transformers import AutoConfig

        # rm_head is left uninitialised here: the checkpoint has it.
        model = build_model(AutoConfig.from_pretrained(base), None, getattr(torch, dtype))
        if full.exists():
            model.resize_token_embeddings(len(self.tokenizer))
        else:
            base_state = read_safetensors_folder("videoalign", base)
            base_state["rm_head.weight"] = model.rm_head.weight.detach()
            tie_lm_head(model, base_state)
            load_strict(model, base_state, base)
            model.resize_token_embeddings(len(self.tokenizer))
        state = model.state_dict()
        if full.exists():
            loaded = current_layout(load_checkpoint_file("videoalign", full))
            lora = {k: v for k, v in loaded.items() if ".lora_" in k}
            state = {k: v for k, v in loaded.items() if ".lora_" not in k}
            tie_lm_head(model, state)
        else:
            from safetensors.torch import load_file

            non_lora = current_layout(load_checkpoint_file("videoalign", ckpt / "non_lora_state_dict.pth"))
            if "rm_head.weight" not in non_lora:
                raise CheckpointError(f"videoalign: {ckpt}/non_lora_state_dict.pth has no rm_head.weight")
            state.update(non_lora)
            lora = current_layout(load_file(str(ckpt / "adapter_model.safetensors")))
        if lora:
            r, alpha = lora_cfg.get("lora_r", 16), lora_cfg.get("lora_alpha", 32)
            scale = alpha / math.sqrt(r) if lora_cfg.get("use_rslora") else alpha / r
            merge_lora(state, lora, scale)
        load_strict(model, state, ckpt)
        self.model = model.to(getattr(torch, dtype)).eval().requires_grad_(False)
        self.model.rm_head.float()
        self.device = default_device(device)
        self.dims, self.normalize, self.offload, self.template = tuple(dims), normalize, offload_when_idle, template
        self.fps = float(self.data_cfg.get("fps", 2.0))
        self.max_pixels = int(self.data_cfg.get("max_frame_pixels", 448 * 448))
        self.min_pixels = min(min_frame_pixels, self.max_pixels)

    def to(self, device):
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def prepare(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict:
        """Videos [B, 3, F, H, W] in [-1, 1] -> the model's inputs (CPU)."""
        idx = sample_indices(videos.shape[2], fps, self.fps, self.spec.temporal_patch_size)
        patches, grids = zip(*(to_patches(v[:, idx].transpose(0, 1), self.spec, self.min_pixels, self.max_pixels)
                               for v in videos))
        texts = [self.template.format(text_prompt=p) for p in prompts]
        inputs = build_inputs(self.tokenizer, self.chat_template, texts, "video", grids, self.spec.merge_size)
        inputs.update(pixel_values_videos=torch.cat(patches), video_grid_thw=torch.tensor(grids))
        return inputs

    @torch.no_grad()
    def details(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict[str, torch.Tensor]:
        inputs = self.prepare(videos, prompts, fps)
        with on_device(self.model, self.device, self.offload):
            dtype = next(self.model.model.visual.parameters()).dtype
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
            raw = self.model.reward(inputs, self.token_ids)[..., 0].cpu()      # [B, 3]: VQ, MQ, TA
        out = {}
        for i, d in enumerate(DIMS):
            v = raw[:, i]
            if self.normalize and f"{d}_mean" in self.infer_cfg:
                v = (v - self.infer_cfg[f"{d}_mean"]) / self.infer_cfg[f"{d}_std"]
            out[f"videoalign/{d}"] = v.float()
        out[self.name] = sum(out[f"videoalign/{d}"] for d in self.dims)
        return out

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        return self.details(videos, prompts, fps)[self.name]
