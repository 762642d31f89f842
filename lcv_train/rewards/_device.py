"""Reward models sit on the CPU while idle and visit their device only while they score."""

from __future__ import annotations

import contextlib

import torch


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
