"""FSDP2 (``torch.distributed.fsdp.fully_shard``): one group per block, bottom-up, then the root.

Which modules are blocks, fp32 groups and input-casting groups is the model's plan (``parallel.plan``; the
DiT's: ``lcv_train/model/parallel_plan.py``).

Mixed precision (``parallel.mixed_precision=bf16``, GPU only): parameters are all-gathered and computed in
bf16, gradients are reduced in fp32, and the sharded master weights (what the optimizer sees) stay fp32.
The parts the plan keeps in fp32 get their own fp32 groups so that ``weight.dtype`` there stays fp32 (the
DiT: the timestep embedder, each block's AdaLN modulation and the final layer, as SPEC section 1 wants). Block inputs are not cast
(``cast_forward_inputs=False``): the timestep embedding and the RoPE tables must stay fp32; the token
stream is already bf16 because the patch embedder (which casts its input) produces it.

Sharding mesh: ``dims.fsdp_mesh`` (``dp_shard_cp``, with ``dp_replicate`` in front for HSDP). Gradients are
averaged over the whole mesh: over data-parallel ranks as usual, and over context-parallel ranks because
the cp operators' backward makes the cp-mean of a rank's gradient equal to the full gradient (see the
convention in ``parallel/context_parallel/comm.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.plan import plan_of


def unwrap(module: nn.Module) -> nn.Module:
    """The plain block under activation-checkpoint and ``torch.compile`` wrappers."""
    while True:
        if hasattr(module, "_checkpoint_wrapped_module"):
            module = module._checkpoint_wrapped_module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def mixed_precision_policies(cfg: ParallelConfig, device: torch.device):
    """(bf16 compute policy, fp32 policy, data-input policy) for this run; all-fp32 on CPU or mixed_precision=fp32."""
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if cfg.mixed_precision != "bf16" or device.type == "cpu":
        return fp32, fp32, fp32
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    inputs = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
    return compute, fp32, inputs


def apply_fsdp(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, mesh=None) -> nn.Module:
    """Shard ``model`` in place: per-block groups (+ fp32 sub-groups), embedders, final layer, then the root.

    ``mesh`` defaults to ``dims.fsdp_mesh`` (the planner passes a fake-process-group mesh on meta)."""
    mesh = mesh if mesh is not None else dims.fsdp_mesh
    compute, fp32, inputs = mixed_precision_policies(cfg, dims.device)
    offload = CPUOffloadPolicy(pin_memory=dims.device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()

    def shard(module, policy, reshard=True):
        fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)

    plan = plan_of(model)
    for path in plan.fsdp_fp32:
        shard(model.get_submodule(path), fp32)
    for path in plan.fsdp_inputs:
        shard(model.get_submodule(path), inputs)
    blocks = getattr(model, plan.blocks)
    n = len(blocks)
    for i, block in enumerate(blocks):
        for path in plan.block_fp32:
            shard(unwrap(block).get_submodule(path), fp32)
        # The last block is needed again first in backward: keep it gathered (the torchtitan choice).
        shard(block, compute, reshard=i < n - 1)
    if plan.fsdp_output:  # fp32, runs first in backward: kept gathered
        shard(model.get_submodule(plan.fsdp_output), fp32, reshard=False)
    shard(model, compute, reshard=False)
    return model


def reshard_fsdp(model: nn.Module) -> None:
    """Drop the whole parameters FSDP2 keeps after a forward (``reshard_after_forward=False`` groups), so the
    next forward gathers the shards again: needed whenever shards are written outside the optimizer (the
    EMA swapping its averages in and out). A no-op for a model without FSDP2 groups."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def fill_shards(model: nn.Module, full_value, from_rank0: bool = False) -> None:
    """Set every entry of ``model.state_dict()`` from its full value, one tensor at a time.

    ``full_value(name, param)`` returns the whole tensor (``name`` is the plain model's name, without the
    wrappers' prefixes; any device and dtype); each rank copies into its local shard the slice it holds
    (FSDP2/HSDP DTensors, uneven shards included), or the whole tensor into a plain one. This is how a model
    sharded on the meta device and materialised with ``to_empty`` gets its starting weights: the full model
    never exists on any rank, only one full tensor at a time.

    ``from_rank0``: only global rank 0 calls ``full_value`` (e.g. it alone read a checkpoint); each tensor is
    broadcast over the default group first. (Ours rather than ``set_model_state_dict(...,
    broadcast_from_rank0=True)``, which aborted about one gloo run in ten at interpreter exit here.)
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from parallel.parallelize import canonical_name

    if from_rank0:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        source = full_value

        def full_value(name: str, param: torch.Tensor) -> torch.Tensor:
            if dist.get_rank() == 0:
                buf = source(name, param).to(device=device, dtype=param.dtype).contiguous()
            else:
                buf = torch.empty(param.shape, dtype=param.dtype, device=device)
            dist.broadcast(buf, src=0)
            return buf

    for name, param in model.state_dict().items():
        full = full_value(canonical_name(name), param)
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))].to(local.device))
        else:
            param.copy_(full)
