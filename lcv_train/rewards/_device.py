"""Reward models sit on the CPU while idle and visit their device only while they score."""

from __future__ import annotations

import contextlib

import torch


def default_device(device: str | None) -> torch.device:
    """``device`` as given, else the GPU when there is one."""
    return torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device, offload: bool = True):
    """Move ``model`` to ``device`` for the block, then back to the CPU when ``offload`` (and device != CPU)."""
    model.to(device)
    try:
        yield model
    finally:
        if offload and device.type != "cpu":
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
