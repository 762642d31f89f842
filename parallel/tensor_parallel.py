"""Tensor parallelism with megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``.

Which linears of each block are split, and how, is the model's plan (``ParallelPlan.tp_linears``; the
DiT's, ``lcv_train/model/parallel_plan.py``: Megatron's attention/MLP split, heads divided across the
``tp`` mesh dim: self-attention ``qkv`` column-parallel, ``proj`` row-parallel; cross-attention
``q_linear`` and ``kv_linear`` column-parallel, ``proj`` row-parallel; FFN ``w1``, ``w3`` column-parallel,
``w2`` row-parallel).

Each TP rank keeps ``heads / tp`` heads (the attention modules' ``heads`` attribute is set to the local
count, which is all the model reads to reshape). The fused layers' output rows are laid out ``[3, heads, hd]``
(``qkv``) and ``[2, heads, hd]`` (``kv_linear``), so a plain row split would give a rank q of some heads and
k of others: rank ``r`` instead gets rows ``[q_r; k_r; v_r]`` (its heads of each part), which keeps the
model's ``view(..., 3, heads, hd)`` valid on the local shard.

Everything outside those layers is replicated and sees the same activations on every TP rank, except the
per-head QK RMSNorm weights: each rank only sees its heads, so their gradients are partial and are summed
over the TP group before the optimizer step (``sum_partial_tp_grads``, called by ``TorchEngine.step``).

Weights are copied from the plain model (megatron's own initialisation is off), so a TP model starts
exactly where the single-process one does. The state dict keeps the published parameter names; TP-split
tensors hold the local shard (in the permuted row order for ``qkv``/``kv_linear``);
``full_state_dict_from_tp`` reassembles the published layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from lcv_train.errors import ConfigError
from parallel.dims import ParallelDims
from parallel.parallelize import canonical_name
from parallel.plan import ParallelPlan, TPLinear, plan_of


def _megatron():
    try:
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError as e:
        raise ConfigError(f"parallel.tp: tp > 1 needs megatron-core (pip install megatron-core): {e}") from e
    return ModelParallelConfig, ColumnParallelLinear, RowParallelLinear


def _no_extra_state(layer: nn.Module) -> None:
    """Megatron layers add an ``_extra_state`` entry to state dicts (for Transformer Engine); ours keep the
    published names only."""
    layer._load_state_dict_pre_hooks.clear()


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    # megatron's linear backward assumes [s, b, h]
    return x.reshape(-1, 1, x.shape[-1])


def _make_layers():
    ModelParallelConfig, ColumnParallelLinear, RowParallelLinear = _megatron()

    class ColumnLinear(ColumnParallelLinear):
        """``ColumnParallelLinear`` that takes and returns plain tensors of any rank (output stays split)."""

        tp_sharded_param_names = ("weight", "bias")
        get_extra_state = nn.Module.get_extra_state  # no "_extra_state" entry in state dicts
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            out, _ = super().forward(_as_3d(x))
            return out.reshape(*x.shape[:-1], out.shape[-1])

    class RowLinear(RowParallelLinear):
        """``RowParallelLinear`` on an already-split input; the output is reduced and the bias added once."""

        tp_sharded_param_names = ("weight",)
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            out, _ = super().forward(_as_3d(x))
            return out.reshape(*x.shape[:-1], out.shape[-1])

    return ModelParallelConfig, ColumnLinear, RowLinear


def _head_rows(n_parts: int, heads: int, hd: int, tp: int, rank: int) -> torch.Tensor:
    """Row indices of a fused ``[n_parts, heads, hd]`` output that TP rank ``rank`` owns, in local order."""
    idx = torch.arange(n_parts * heads * hd).view(n_parts, tp, heads // tp, hd)
    return idx[:, rank].reshape(-1)


def _contiguous_rows(n: int, tp: int, rank: int) -> torch.Tensor:
    return torch.arange(n).view(tp, n // tp)[rank]


def _rows(rule: TPLinear, n: int, heads: int, hd: int, tp: int, rank: int) -> torch.Tensor:
    """The output rows of a column-split linear that TP rank ``rank`` owns, in local order."""
    return _head_rows(rule.head_parts, heads, hd, tp, rank) if rule.head_parts else _contiguous_rows(n, tp, rank)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Swap the attention and FFN linears of every block for megatron-core TP layers (in place)."""
    tp, rank = dims.tp, dims.tp_rank
    dims.check_model(model.config)
    group = dims.group("tp")
    ModelParallelConfig, ColumnLinear, RowLinear = _make_layers()
    dtype = next(model.parameters()).dtype
    mp_cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=dtype, sequence_parallel=False,
                                 gradient_accumulation_fusion=False)
    init = nn.init.zeros_  # never called (perform_initialization=False); weights are copied below
    plan = plan_of(model)
    heads = getattr(model.config, plan.config_heads)
    hd = getattr(model.config, plan.config_head_dim)

    def column(lin: nn.Linear, rows: torch.Tensor) -> nn.Module:
        new = ColumnLinear(lin.in_features, lin.out_features, config=mp_cfg, init_method=init,
                           bias=lin.bias is not None, gather_output=False, tp_group=group)
        with torch.no_grad():
            new.weight.copy_(lin.weight[rows])
            if lin.bias is not None:
                new.bias.copy_(lin.bias[rows])
        _no_extra_state(new)
        return new.to(lin.weight.device)

    def row(lin: nn.Linear) -> nn.Module:
        new = RowLinear(lin.in_features, lin.out_features, config=mp_cfg, init_method=init,
                        bias=lin.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=group)
        cols = _contiguous_rows(lin.in_features, tp, rank)
        with torch.no_grad():
            new.weight.copy_(lin.weight[:, cols])
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        _no_extra_state(new)
        return new.to(lin.weight.device)

    for block in getattr(model, plan.blocks):
        for rule in plan.tp_linears:
            parent_path, _, leaf = rule.path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            lin = getattr(parent, leaf)
            if rule.split == "row":
                setattr(parent, leaf, row(lin))
            else:
                setattr(parent, leaf, column(lin, _rows(rule, lin.out_features, heads, hd, tp, rank)))
        for path in plan.tp_attention:
            block.get_submodule(path).heads = heads // tp
        for path in plan.tp_partial_grads:
            block.get_submodule(path).tp_partial_grad_param_names = ("weight",)
    model.tp_group = group
    return model


def sum_partial_tp_grads(model: nn.Module, group) -> None:
    """Sum over TP ranks the gradients of replicated parameters that only saw this rank's heads.

    Works on FSDP2-sharded gradients too: TP peers share their data-parallel coordinates, hence their shards."""
    for m in model.modules():
        for name in getattr(m, "tp_partial_grad_param_names", ()):
            p = getattr(m, name)
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(g, group=group)


def full_state_dict_from_tp(local_sd: dict[str, torch.Tensor], model_cfg, group,
                            plan: ParallelPlan) -> dict[str, torch.Tensor]:
    """Reassemble the published (unsplit) layout from each TP rank's local state dict (collective over
    ``group``). Column-split tensors are concatenated along dim 0 and un-permuted; row-split weights along
    dim 1. ``plan``: the model's."""
    tp = dist.get_world_size(group)
    heads, hd = getattr(model_cfg, plan.config_heads), getattr(model_cfg, plan.config_head_dim)
    out = {}
    for k, v in local_sd.items():
        rule, param = plan.tp_linear(k)
        is_row = rule is not None and rule.split == "row" and param == "weight"
        is_col = rule is not None and rule.split == "column"
        if not (is_col or is_row):
            out[k] = v
            continue
        parts = [torch.empty_like(v) for _ in range(tp)]
        dist.all_gather(parts, v.contiguous(), group=group)
        if is_row:
            out[k] = torch.cat(parts, dim=1)
            continue
        full = torch.cat(parts, dim=0)
        order = torch.cat([_rows(rule, full.shape[0], heads, hd, tp, r) for r in range(tp)])
        restored = torch.empty_like(full)
        restored[order] = full
        out[k] = restored
    return out


# -- checkpoints --------------------------------------------------------------------------------------
# DCP treats a plain tensor (or a DTensor chunk) that several ranks hold under the same key as replicated
# and writes it once. TP-split parameters differ between TP ranks under the same name, so their keys get
# the TP rank appended; everything else (replicated across TP ranks) keeps its name.

def tp_split_names(model: nn.Module) -> set[str]:
    """Clean FQNs of the parameters split across TP ranks."""
    out = set()
    for mname, m in model.named_modules():
        for pname in getattr(m, "tp_sharded_param_names", ()):
            if getattr(m, pname, None) is not None:
                out.add(canonical_name(f"{mname}.{pname}" if mname else pname))
    return out


def _rename(model, model_sd, optim_sd, group, forward: bool):
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    names = tp_split_names(model)
    suffix = f"@tp{rank}of{tp}"
    if forward:
        fix = {n: n + suffix for n in names}
    else:
        fix = {n + suffix: n for n in names}
        stray = [k for k in model_sd if "@tp" in k and k not in fix]
        if stray or any(k not in model_sd for k in fix):
            from lcv_train.errors import CheckpointError

            raise CheckpointError(f"checkpoint does not match the tensor-parallel layout tp={tp}: expected keys like "
                                  f"{next(iter(fix), '?')!r}, found {stray[:1] or 'unsplit tensors'} "
                                  "(load with the tp it was saved with)")
    model_sd = {fix.get(k, k): v for k, v in model_sd.items()}
    if optim_sd is not None:
        optim_sd = dict(optim_sd)
        optim_sd["state"] = {fix.get(k, k): v for k, v in optim_sd.get("state", {}).items()}
        optim_sd["param_groups"] = [{**g, "params": [fix.get(k, k) for k in g["params"]]}
                                    for g in optim_sd.get("param_groups", [])]
    return model_sd, optim_sd


def tag_tp_keys(model: nn.Module, model_sd: dict, optim_sd: dict | None, group):
    """Rename TP-split entries of ``get_state_dict``'s model and optimizer state dicts to ``<name>@tp<r>of<tp>``."""
    return _rename(model, model_sd, optim_sd, group, forward=True)


def untag_tp_keys(model: nn.Module, model_sd: dict, optim_sd: dict | None, group):
    """Inverse of ``tag_tp_keys``; a one-line ``CheckpointError`` when the checkpoint's tp differs."""
    return _rename(model, model_sd, optim_sd, group, forward=False)


def consolidate_tp_state_dict(sd: dict, model_cfg, plan: ParallelPlan) -> dict:
    """Full tensors from a checkpoint's per-TP-rank pieces (``<name>@tp<r>of<tp>``), for export.

    The inverse of the splits ``apply_tensor_parallel`` makes (``plan``: the model's, e.g. the DiT's
    ``lcv_train.model.parallel_plan.dit_parallel_plan()``):
    column-split layers own the rows of their heads (fused parts keep q, k, v of one head group together)
    or a contiguous row range; row-split weights own a contiguous column range. Untagged entries pass through."""
    heads, hd = getattr(model_cfg, plan.config_heads), getattr(model_cfg, plan.config_head_dim)
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    out, tps = {}, {}
    for key, t in sd.items():
        if "@tp" not in key:
            out[key] = t
            continue
        name, tag = key.split("@tp")
        rank, tp = (int(x) for x in tag.split("of"))
        pieces.setdefault(name, {})[rank] = t
        tps[name] = tp
    for name, parts in pieces.items():
        tp = tps[name]
        if sorted(parts) != list(range(tp)):
            from lcv_train.errors import CheckpointError

            raise CheckpointError(f"{name}: the checkpoint has TP pieces {sorted(parts)} of {tp}")
        rule, param = plan.tp_linear(name)
        if rule is not None and rule.split == "row" and param == "weight":
            out[name] = torch.cat([parts[r] for r in range(tp)], dim=1)
            continue
        n = sum(p.shape[0] for p in parts.values())
        full = parts[0].new_empty((n, *parts[0].shape[1:]))
        for r in range(tp):
            rows = _rows(rule, n, heads, hd, tp, r) if rule is not None else _contiguous_rows(n, tp, r)
            full[rows] = parts[r]
        out[name] = full
    return out
