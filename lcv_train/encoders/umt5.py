"""umT5-XXL (transformers ``UMT5EncoderModel`` + its tokenizer) loaded from a local LongCat-Video folder.

Captions are tokenized with EOS, truncated and padded to ``max_length`` (512 for LongCat), encoded with
the attention mask, and the padded positions of ``last_hidden_state`` are set to zero (LongCat's
``text_tokens_zero_pad``). ``emb`` is ``[B, max_length, d_model]`` float32, ``mask`` ``[B, max_length]`` bool.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lcv_train.encoders.base import TextEncoder, find_model_folder

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def _find_tokenizer_folder(path: str, subfolder: str, key: str) -> Path:
    folder = Path(path).expanduser() / subfolder if subfolder else Path(path).expanduser()
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}={path}: no tokenizer in {folder} "
                                f"(expected {folder / TOKENIZER_FILES[0]} or {TOKENIZER_FILES[1]}); "
                                f"set {key}=/path/to/LongCat-Video with the complete download")
    return folder


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; pass whichever this version reads."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class UMT5TextEncoder(TextEncoder):
    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 512) -> None:
        super().__init__()
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("umt5 tokenizer has no pad token; it cannot pad captions to max_length")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.d_model)
        self.freeze()

    @classmethod
    def from_local(cls, path: str, subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer",
                   max_length: int = 512, dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cpu", key: str = "text_encoder.path") -> "UMT5TextEncoder":
        folder = find_model_folder(path, subfolder, key, WEIGHT_FILES)
        tok_folder = _find_tokenizer_folder(path, tokenizer_subfolder, key)
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True, **_dtype_kwarg(dtype))
        return cls(model, tokenizer, max_length=max_length).to(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out, mask
