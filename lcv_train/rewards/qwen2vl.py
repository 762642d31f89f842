"""What the Qwen2-VL-based reward models (HPSv3, VideoAlign) share: the model with a reward head, frame
preprocessing into Qwen2-VL patches, prompts with the vision placeholder expanded, and loading published
checkpoints written under the older transformers layout (with or without LoRA).

The model is transformers' ``Qwen2VLForConditionalGeneration`` plus ``rm_head``; the reward is ``rm_head``
applied to the last hidden state at the positions of the reward's special tokens. Preprocessing is done
here in torch (resize to a multiple of patch x merge within a pixel budget, the checkpoint's mean/std,
Qwen2-VL's patch order) so no torchvision is needed; ``tests/rewards`` checks it against transformers'
image processor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcv_train.errors import CheckpointError
from lcv_train.rewards._loading import read_json

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
TOKEN_TYPE = {IMAGE_PAD: 1, VIDEO_PAD: 2}  # mm_token_type_ids: text 0, image 1, video 2


@dataclass
class VisionSpec:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_folder(cls, scorer: str, folder: Path) -> "VisionSpec":
        pre = read_json(scorer, folder / "preprocessor_config.json")
        return cls(pre.get("patch_size", 14), pre.get("merge_size", 2), pre.get("temporal_patch_size", 2),
                   tuple(pre.get("image_mean", cls.mean)), tuple(pre.get("image_std", cls.std)))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and the area within [min_pixels, max_pixels]."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_patches(frames: torch.Tensor, spec: VisionSpec, min_pixels: int, max_pixels: int):
    """Frames [T, 3, H, W] in [-1, 1] -> (patches [N, 3 * tp * p * p] float32, grid (t, h, w) in patches).

    Resized (bicubic, antialiased, on the [0, 255] scale and rounded like a decoded frame) to fit the pixel
    budget, normalised, T padded to a multiple of the temporal patch with the last frame (an image is one
    frame repeated), and laid out in Qwen2-VL's order: merge windows row-major, then the patches inside a
    window, each patch flattened as (channel, time, row, column).
    """
    T, C, H, W = frames.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    h, w = fit_size(H, W, spec.factor, min_pixels, max_pixels)
    x = ((frames.float() + 1) * 127.5).clamp(0, 255)
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255) / 255.0
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.view(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)          # (t, hb, wb, mh, mw, C, tp, ph, pw)
    return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def build_inputs(tokenizer, chat_template, texts, kind: str, grids, merge_size: int):
    """One user turn per sample (the image/video, then its text) through the chat template; the single
    placeholder of each sample expanded to its number of merged patches. Returns input_ids, attention_mask,
    mm_token_type_ids (right padding)."""
    pad = {"image": IMAGE_PAD, "video": VIDEO_PAD}[kind]
    prompts = []
    for text, grid in zip(texts, grids):
        chat = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        s = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
        if s.count(pad) != 1:
            raise ValueError(f"the chat template must place exactly one {pad} per {kind}, got {s.count(pad)}")
        n = math.prod(grid) // merge_size**2
        prompts.append(s.replace(pad, pad * n))
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"]
    types = torch.zeros_like(ids)
    for token, value in TOKEN_TYPE.items():
        types[ids == tokenizer.convert_tokens_to_ids(token)] = value
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": types}


def load_chat_template(tokenizer, folder: Path) -> str:
    """The base model's chat template: the tokenizer's, else the processor's chat_template.json / .jinja."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return read_json("qwen2-vl", folder / "chat_template.json")["chat_template"]
    raise CheckpointError(f"{folder}: no chat template (tokenizer_config.json, chat_template.jinja or .json)")


def reward_head(state: dict[str, torch.Tensor]) -> nn.Module:
    """The ``rm_head`` a checkpoint holds: one Linear (``rm_head.weight``), or a Sequential whose Linear
    layers sit at the stored indices with ReLU right after each and Dropout (identity at eval) elsewhere."""
    if "rm_head.weight" in state:
        w = state["rm_head.weight"]
        return nn.Linear(w.shape[1], w.shape[0], bias="rm_head.bias" in state)
    idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"rm_head\.(\d+)\.weight$", k))})
    if not idx:
        raise CheckpointError("the checkpoint has no rm_head weights")
    layers: list[nn.Module] = []
    for i in range(idx[-1] + 1):
        if i in idx:
            w = state[f"rm_head.{i}.weight"]
            layers.append(nn.Linear(w.shape[1], w.shape[0], bias=f"rm_head.{i}.bias" in state))
        else:
            layers.append(nn.ReLU() if i - 1 in idx else nn.Identity())
    return nn.Sequential(*layers)


_LORA = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a published checkpoint -> this transformers' ``Qwen2VLForConditionalGeneration`` keys.

    Drops PEFT's ``base_model.model.`` prefix and ``.base_layer``; the pre-4.52 layout (``model.layers``,
    ``visual.``) moves under ``model.language_model`` / ``model.visual``. LoRA keys keep their suffix.
    """
    out = {}
    for key, value in state.items():
        k = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = value
    return out


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> None:
    """``W += scale * B @ A`` for every LoRA pair in ``lora`` (keys in the current layout), in place."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        m = _LORA.match(key)
        if m is None:
            raise CheckpointError(f"unexpected key {key!r} among the LoRA weights")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    for module, ab in pairs.items():
        target = f"{module}.weight"
        if target not in state or set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA for {module!r} has no matching weight or lacks A/B")
        w = state[target]
        state[target] = (w.float() + scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)


def reward_model_class():
    """``Qwen2VLForConditionalGeneration`` with ``rm_head`` and the reward read at special tokens."""
    import inspect

    import transformers
    from transformers import Qwen2VLForConditionalGeneration

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if (major, minor) < (4, 52):
        raise CheckpointError(f"the Qwen2-VL rewards need transformers >= 4.52 (model.language_model layout), "
                              f"found {transformers.__version__}: pip install -U transformers")

    class Qwen2VLReward(Qwen2VLForConditionalGeneration):
        def __init__(self, config, head: nn.Module | None = None):
            super().__init__(config)
            self.rm_head = head if head is not None else nn.Linear(config.text_config.hidden_size, 1, bias=False)

        def reward(self, inputs: dict, token_ids: list[int]) -> torch.Tensor:
            """[B, len(token_ids), out]: rm_head (float32) at each sample's reward tokens, in order."""
            if "mm_token_type_ids" not in inspect.signature(self.model.forward).parameters:
                inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}   # transformers < 5
            out = self.model(**inputs, use_cache=False)
            hidden = out.last_hidden_state
            ids = inputs["input_ids"]
            rows = []
            for b in range(ids.shape[0]):
                pos = [int((ids[b] == t).nonzero()[0]) if (ids[b] == t).any() else -1 for t in token_ids]
                if min(pos) < 0:
                    raise ValueError("a reward token is missing from the prompt (truncated?)")
                rows.append(hidden[b, pos])
            h = torch.stack(rows).float()
            with torch.autocast(h.device.type, enabled=False):
                return self.rm_head.float()(h)

    return Qwen2VLReward


def build_model(config, head: nn.Module | None, dtype: torch.dtype) -> nn.Module:
    """The reward model in ``dtype`` with its weights left uninitialised (a checkpoint fills them all):
    a 7B model is never materialised in float32 nor randomly initialised first."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights() if callable(no_init_weights) else contextlib.nullcontext():
            model = reward_model_class()(config, head=head)
    finally:
        torch.set_default_dtype(previous)
    return model


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Every parameter from ``state``, nothing left over; else one line naming the checkpoint and keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        show = lambda ks: ", ".join(ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")  # noqa: E731
        parts = [f"missing {show(missing)}" if missing else "", f"unexpected {show(unexpected)}" if unexpected else "",
                 f"mis-shaped {show(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source}: does not match the model: {'; '.join(p for p in parts if p)}")
    model.load_state_dict(state, strict=True)
