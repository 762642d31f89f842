"""Training engines: what turns a loss into an optimizer step, for each parallel layout.

The trainer only talks to this interface: ``backward(loss)``, ``step() -> grad norm``, ``autocast()``,
``state_dict()`` / ``load_state_dict()`` (model + optimizer, in a form DCP saves sharded and can load on
a different world size), ``full_model_state_dict()``, and ``model`` / ``optimizer``.
``build_engine`` picks the engine for a ``ParallelConfig``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of ``grads`` (DTensors are reduced over their mesh: FSDP shards count once)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float().pow(2)


def tp_sharded_params(model: torch.nn.Module) -> set[int]:
    """ids of parameters split across tensor-parallel ranks (declared by ``parallel.tensor_parallel`` layers)."""
    ids = set()
    for m in model.modules():
        for name in getattr(m, "tp_sharded_param_names", ()):
            p = getattr(m, name, None)
            if p is not None:
                ids.add(id(p))
    return ids


def decays_weight(module: torch.nn.Module, name: str) -> bool:
    """Does AdamW's weight decay apply to ``module``'s own parameter ``name``? Not to biases, to the
    parameters of normalisation layers (torch's norms, or any module class named ``*Norm``: the DiT's
    RMSNorm) or to embedding tables (``nn.Embedding``): decay would pull gains towards 0 and shifts and
    lookup rows towards 0, which regularises nothing. Every other weight (linear, conv, LoRA) decays."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
    if name == "bias":
        return False
    if isinstance(module, norms) or type(module).__name__.endswith("Norm"):
        return False
    return not isinstance(module, torch.nn.Embedding)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: ``weight_decay`` on those ``decays_weight``
    picks, 0 on the rest (empty groups left out). Works on the plain, FSDP2-sharded or ZeRO-3-partitioned
    model (the rule reads module types and parameter names, not shapes)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if decays_weight(module, name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_compatible(expected: dict, loaded: dict) -> None:
    """One ``CheckpointError`` line when a model state dict does not fit the model (other model config)."""
    from lcv_train.errors import CheckpointError

    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: {len(missing)} missing tensors (e.g. "
                              f"{missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
                              "was it saved with another model config?")
    for k, v in expected.items():
        a, b = tuple(getattr(v, "shape", ())), tuple(getattr(loaded[k], "shape", ()))
        if a != b:
            raise CheckpointError(f"checkpoint does not match the model: {k} has shape {list(b)} in the "
                                  f"checkpoint but {list(a)} in the model (was it saved with another model config?)")


class TorchEngine:
    """Plain PyTorch (one process), FSDP2/HSDP (the model arrives sharded by ``parallelize_model``), and
    tensor parallel (``tp_group``: the gradient norm then adds up the TP-split parameters across TP ranks
    and counts the replicated ones once). ``save_frozen=False``: checkpoints leave out parameters that do not
    train (a LoRA run's base, rebuilt from ``trainer.init_from`` at every start)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, device: torch.device | None = None, tp_group=None,
                 save_frozen: bool = True):
        self.model = model
        self.save_frozen = save_frozen
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.device = device or torch.device("cpu")
        self.tp_group = tp_group

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> tuple[float, list[torch.Tensor]]:
        """Global L2 norm of all gradients (every rank gets the same number) and the grads themselves."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            sq = _sq_norm([p.grad for p in params])
        else:
            split = tp_sharded_params(self.model)
            sq_tp = _sq_norm([p.grad for p in params if id(p) in split])
            sq_rep = _sq_norm([p.grad for p in params if id(p) not in split])
            dist.all_reduce(sq_tp, group=self.tp_group)
            sq = sq_tp + sq_rep
        return math.sqrt(float(sq)), [p.grad for p in params]

    # A non-finite gradient norm (the same number on every rank) skips the update: the weights stay finite.
    can_skip_nonfinite = True

    def step(self) -> float:
        """Clip and apply the accumulated gradients; return their global norm. When the norm is NaN/inf the
        update is skipped (gradients dropped, optimizer untouched) on every rank alike."""
        if self.tp_group is not None:
            from parallel.tensor_parallel import sum_partial_tp_grads

            sum_partial_tp_grads(self.model, self.tp_group)
        norm, grads = self.grad_norm()
        if not math.isfinite(norm):
            self.skip_step()
            return norm
        if self.grad_clip and self.grad_clip > 0:
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_([_local(g) for g in grads], coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """Drop the accumulated gradients without an update."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """``{"model", "optim"}`` from ``get_state_dict``: DTensor shards under FSDP (DCP reshards on load
        over any dp/cp layout). Under tensor parallel, TP-split tensors are keyed ``<name>@tp<rank>of<tp>``
        (see ``parallel.tensor_parallel.tag_tp_keys``) so DCP keeps every TP rank's part: such checkpoints
        load only with the same tp."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        model_sd = self._saved(model_sd)
        if self.tp_group is not None:
            from parallel.tensor_parallel import tag_tp_keys

            model_sd, optim_sd = tag_tp_keys(self.model, model_sd, optim_sd, self.tp_group)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict) -> None:
        model_sd, optim_sd = sd["model"], sd["optim"]
        if self.tp_group is not None:
            from parallel.tensor_parallel import untag_tp_keys

            model_sd, optim_sd = untag_tp_keys(self.model, model_sd, optim_sd, self.tp_group)
        check_compatible(self._saved(get_model_state_dict(self.model)), model_sd)
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(strict=self.save_frozen))

    def _saved(self, model_sd: dict) -> dict:
        """What of the model a checkpoint holds: everything, or (``save_frozen=False``) the trainable tensors."""
        if self.save_frozen:
            return model_sd
        from parallel.parallelize import canonical_name

        frozen = {canonical_name(n) for n, p in self.model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in model_sd.items() if k not in frozen}

    def full_model_state_dict(self) -> dict:
        """Unsharded model weights in the published layout, on CPU, on rank 0 (others get ``{}``; collective:
        call on every rank). Under tensor parallel the TP shards are gathered and un-permuted too."""
        if self.tp_group is None:
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        from parallel.tensor_parallel import full_state_dict_from_tp

        local = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        from parallel.plan import plan_of

        core = _core_of(self.model)
        full = full_state_dict_from_tp(local, core.config, self.tp_group, plan_of(core))
        # copies: without FSDP the full state dict aliases the live parameters
        return {k: v.detach().to("cpu", copy=True) for k, v in full.items()} if dist.get_rank() == 0 else {}


def _core_of(model):
    from parallel.fsdp import unwrap

    return unwrap(model)


def build_engine(model: torch.nn.Module, optimizer_cfg, dims, cfg, grad_clip: float = 1.0, *,
                 grad_accum_steps: int = 1, save_frozen: bool = True):
    """The engine for ``cfg.engine``: ``TorchEngine`` (fsdp/single) or ``ZeroEngine`` (zero2/zero3).

    ``model`` is what ``parallelize_model`` returned. ``optimizer_cfg`` is either a built
    ``torch.optim.Optimizer`` (torch engine only) or a mapping with AdamW settings
    ``lr, betas, weight_decay, eps`` (both engines; DeepSpeed builds its own optimizer from it), applied
    to the parameter groups of ``weight_decay_groups`` (no decay on biases, norms, embedding tables).
    ``grad_accum_steps``: how many ``backward`` calls precede each ``step`` (DeepSpeed must know; the
    caller divides the loss by it for every engine). ``save_frozen``: see ``TorchEngine`` (ZeRO never saves
    frozen parameters)."""
    autocast = torch.bfloat16 if (cfg.mixed_precision == "bf16" and dims.device.type == "cuda") else None
    if cfg.engine in ("zero2", "zero3"):
        from parallel.zero import ZeroEngine

        return ZeroEngine(model, optimizer_cfg, dims, cfg, grad_clip=grad_clip, grad_accum_steps=grad_accum_steps)
    if isinstance(optimizer_cfg, torch.optim.Optimizer):
        optimizer = optimizer_cfg
    else:
        o = dict(optimizer_cfg)
        optimizer = torch.optim.AdamW(weight_decay_groups(model, o.get("weight_decay", 0.0)), lr=o.get("lr", 1e-4),
                                      betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8))
    return TorchEngine(model, optimizer, grad_clip=grad_clip, autocast_dtype=autocast, device=dims.device,
                       tp_group=dims.group("tp") if dims.tp > 1 else None, save_frozen=save_frozen)
