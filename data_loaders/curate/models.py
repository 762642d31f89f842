"""Pluggable model-based steps that load local weights: scorers and the captioner.

A scorer (``aesthetic``, ``text_coverage``, ``watermark``) is a TorchScript file: it takes the sampled
frames of a clip as float32 ``[N, 3, H, W]`` in [0, 1] and returns ``[N]`` (or ``[N, 1]``) scores; the
clip's value is their mean. The captioner is ``"pkg.module:function"`` (called with the list of
sampled uint8 RGB frames, returns a string, or a dict with ``caption`` and any of ``shot_size``, ``lens``,
``style``) or a local transformers image-to-text model directory
(captions the middle frame). Anything absent or failing to load is skipped with one logged reason;
the reasons are counted in the report. Models are loaded once per worker process.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("data_loaders.curate")

_CACHE: dict[tuple[str, str], Any] = {}


def _import_callable(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"{spec!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(mod), fn)


def load_scorer(name: str, path: Optional[str]) -> tuple[Optional[Any], Optional[str]]:
    """(model, None) or (None, why it is skipped)."""
    if not path:
        return None, f"{name}: no weights given (--scorer {name}=PATH to a TorchScript file)"
    if not os.path.isfile(path):
        return None, f"{name}: weights not found at {path}"
    key = ("scorer", path)
    if key not in _CACHE:
        try:
            import torch

            torch.set_num_threads(1)
            _CACHE[key] = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001
            _CACHE[key] = f"{name}: cannot load {path}: {type(e).__name__}: {e}"
    m = _CACHE[key]
    return (None, m) if isinstance(m, str) else (m, None)


def run_scorer(model: Any, frames: Sequence[np.ndarray]) -> float:
    import torch

    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    with torch.no_grad():
        y = model(x)
    return float(torch.as_tensor(y, dtype=torch.float32).reshape(len(frames), -1)[:, 0].mean())


def load_captioner(spec: Optional[str]) -> tuple[Optional[Callable], Optional[str]]:
    if not spec:
        return None, "captioner: none given (--captioner); captions come from sidecar files"
    key = ("captioner", spec)
    if key not in _CACHE:
        try:
            if os.path.isdir(spec):
                from transformers import pipeline

                pipe = pipeline("image-to-text", model=spec, device="cpu")

                def caption(frames: Sequence[np.ndarray]) -> str:
                    from PIL import Image

                    out = pipe(Image.fromarray(frames[len(frames) // 2]))
                    return str(out[0]["generated_text"]).strip()

                _CACHE[key] = caption
            elif ":" in spec:
                _CACHE[key] = _import_callable(spec)
            else:
                _CACHE[key] = f"captioner: {spec} is neither a model directory nor 'package.module:function'"
        except Exception as e:  # noqa: BLE001
            _CACHE[key] = f"captioner: cannot load {spec}: {type(e).__name__}: {e}"
    c = _CACHE[key]
    return (None, c) if isinstance(c, str) else (c, None)


def load_translator(spec: Optional[str]) -> tuple[Optional[Callable], Optional[str]]:
    if not spec:
        return None, "translate: no hook given (--translate package.module:function)"
    try:
        return _import_callable(spec), None
    except Exception as e:  # noqa: BLE001
        return None, f"translate: cannot import {spec}: {type(e).__name__}: {e}"
