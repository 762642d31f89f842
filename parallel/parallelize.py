"""``parallelize_model``: turn the plain DiT into its distributed form, in a fixed order
(tensor parallel, context parallel, activation checkpointing, compile, then FSDP2).
The model code knows nothing about any of it; what is specific to the model (its blocks, fp32 parts, TP
splits) comes from its plan (``model.parallel_plan()``, ``parallel/plan.py``).

The DeepSpeed engines (``parallel.engine in (zero2, zero3)``) get only activation checkpointing and
compile here; DeepSpeed itself partitions the model in ``parallel.zero``.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.plan import plan_of


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model (the published name), without the prefixes the activation
    checkpointing and compile wrappers add to the names of a parallelized model."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def apply_activation_checkpointing(model: torch.nn.Module, every: int) -> None:
    """Checkpoint every ``every``-th block of the plan's (1 = all blocks, 2 = blocks 0, 2, 4, ...)."""
    blocks = getattr(model, plan_of(model).blocks)
    for i, block in enumerate(blocks):
        if i % every == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: torch.nn.Module) -> None:
    """``torch.compile`` each block on its own (same code for every block, so one compiled graph is reused)."""
    blocks = getattr(model, plan_of(model).blocks)
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=False)


def apply_context_parallel_op(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> None:
    from parallel.context_parallel import apply_context_parallel

    apply_context_parallel(model, dims.submesh("cp"), cfg.cp_mode, cfg.cp_split_hw)


def parallelize_model(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> torch.nn.Module:
    """Apply, in order: TP (tp > 1), CP (cp > 1), activation checkpointing, compile, FSDP2 (fsdp engine and
    any dp or cp > 1). The model must be on ``dims.device`` (or meta, for the planner). Returns the model."""
    cfg.validate()
    if hasattr(model, "config"):
        dims.check_model(model.config)
    if dims.tp > 1:
        from parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims)
    if dims.cp > 1:
        apply_context_parallel_op(model, dims, cfg)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if cfg.engine == "fsdp" and dims.uses_fsdp:
        from parallel.fsdp import apply_fsdp

        apply_fsdp(model, dims, cfg)
    return model
