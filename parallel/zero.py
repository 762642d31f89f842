"""DeepSpeed ZeRO-2 / ZeRO-3 behind the same engine interface as ``TorchEngine``.

``parallel.engine=zero2|zero3`` (``conf/parallel/zero2.yaml``, ``zero3.yaml``): DeepSpeed partitions optimizer
state and gradients (stage 2) and parameters too (stage 3) over all ranks; plain data parallelism only
(no cp/tp, checked in ``ParallelDims.from_config``). ``build_ds_config`` turns the layout and the optimizer
settings into DeepSpeed's config dict (AdamW, gradient clipping, bf16 on GPU / fp32 on CPU). On CPU set
``DS_ACCELERATOR=cpu`` (DeepSpeed then communicates with gloo when oneCCL is absent).

State dict (what the checkpointer saves with DCP): ``{"model": {name: full fp32 master weight},
"optim": {"step": int, "state": {name: {"exp_avg", "exp_avg_sq"}}}}``, every tensor full-size and
identical on all ranks, with the published parameter names — so it loads on any world size and into the
FSDP engine's full state dict, at the cost of gathering O(model) floats per rank while saving. For very
large models use ``save_native`` / ``load_native`` (DeepSpeed's own sharded checkpoint; same world size).
"""

from __future__ import annotations

import contextlib
import os

import torch

from lcv_train.errors import ConfigError


def _deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("parallel.engine: zero2/zero3 need DeepSpeed (pip install --no-build-isolation "
                          f"deepspeed): {e}") from e
    return deepspeed


def build_ds_config(cfg, optimizer_cfg: dict, *, grad_clip: float, world_size: int, device: torch.device,
                    micro_batch: int = 1, grad_accum_steps: int = 1) -> dict:
    """DeepSpeed's config dict for ``cfg.engine`` (zero2/zero3) and AdamW settings
    ``{lr, betas, eps, weight_decay}``."""
    stage = {"zero2": 2, "zero3": 3}[cfg.engine]
    bf16 = cfg.mixed_precision == "bf16" and device.type == "cuda"
    o = dict(optimizer_cfg)
    zero = {"stage": stage, "overlap_comm": device.type == "cuda", "contiguous_gradients": True,
            "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(5e8), "stage3_param_persistence_threshold": int(1e5),
                     "stage3_gather_16bit_weights_on_model_save": False})
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch * grad_accum_steps * world_size,
        "gradient_clipping": float(grad_clip or 0.0),
        "optimizer": {"type": "AdamW", "params": {
            "lr": float(o.get("lr", 1e-4)), "betas": [float(b) for b in o.get("betas", (0.9, 0.999))],
            "eps": float(o.get("eps", 1e-8)), "weight_decay": float(o.get("weight_decay", 0.0)),
            # torch's AdamW on CPU (DeepSpeed's fused Adam is CUDA-only); DeepSpeed's CPU Adam when offloading
            "torch_adam": device.type != "cuda" and not cfg.cpu_offload,
        }},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroEngine:
    """``DeepSpeedEngine`` behind the ``TorchEngine`` interface.

    ``backward`` may be called ``grad_accum_steps`` times before each ``step`` (the caller scales the loss,
    as with ``TorchEngine``; DeepSpeed's own 1/gas scaling is off). ``step`` returns the global gradient
    norm before clipping."""

    def __init__(self, model: torch.nn.Module, optimizer_cfg, dims, cfg, *, grad_clip: float = 1.0,
                 grad_accum_steps: int = 1):
        if isinstance(optimizer_cfg, torch.optim.Optimizer):
            g = optimizer_cfg.param_groups[0]
            optimizer_cfg = {"lr": g["lr"], "betas": g["betas"], "eps": g["eps"], "weight_decay": g["weight_decay"]}
        ds = _deepspeed()
        self.dims, self.device = dims, dims.device
        self.config = build_ds_config(cfg, optimizer_cfg, grad_clip=grad_clip, world_size=dims.world_size,
                                      device=dims.device, grad_accum_steps=grad_accum_steps)
        self.names = {id(p): n for n, p in model.named_parameters()}
        from parallel.engine import weight_decay_groups

        groups = weight_decay_groups(model, float(optimizer_cfg.get("weight_decay", 0.0)))
        self.ds, zero_optimizer, _, _ = ds.initialize(model=model, config=self.config, model_parameters=groups,
                                                      dist_init_required=False)
        # The plain torch AdamW inside ZeRO's wrapper: its param_groups are what ZeRO steps with, so lr
        # schedulers can drive it like any torch optimizer.
        self.zero_optimizer = zero_optimizer
        self.optimizer = getattr(zero_optimizer, "optimizer", zero_optimizer)
        self.model = self.ds
        self.module = model
        self.bf16 = self.config["bf16"]["enabled"]
        self._last_norm = 0.0

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself when bf16 is on

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # DeepSpeed counts micro-steps in step(); no optimizer step happens here

    # DeepSpeed clips and updates in one call, so a non-finite step cannot be skipped: the trainer stops.
    can_skip_nonfinite = False

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- state -----------------------------------------------------------------------------------
    def _named_params(self):
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        """Full fp32 weights and Adam moments by parameter name (collective: call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._init_optimizer_state()  # zero moments before the first step, so the structure is always complete
        model, state = {}, {}
        for n, p in self._named_params():
            model[n] = safe_get_full_fp32_param(p).detach().cpu()
            st = {}
            for key in ("exp_avg", "exp_avg_sq"):
                t = safe_get_full_optimizer_state(p, key)
                if t is not None:
                    st[key] = t.detach().cpu()
            if st:
                state[n] = st
        return {"model": model, "optim": {"step": int(self.ds.global_steps), "state": state}}

    def load_state_dict(self, sd: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from parallel.engine import check_compatible

        check_compatible({n: torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta")
                          for n, p in self._named_params()}, sd["model"])
        states = sd.get("optim", {}).get("state", {})
        step = int(sd.get("optim", {}).get("step", 0))
        if states:
            self._init_optimizer_state()
        import deepspeed

        for n, p in self._named_params():
            value = sd["model"][n].to(self.device)
            safe_set_full_fp32_param(p, value)  # the optimizer's fp32 master partition
            # ... and the module's (compute) copy, which DeepSpeed refreshes only after the next step
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                with torch.no_grad():
                    p.data.copy_(value.to(p.dtype))
            for key, t in states.get(n, {}).items():
                safe_set_full_optimizer_state(p, t.to(self.device), key)
        self.ds.global_steps = step
        for p in self._flat_partitions():
            st = self.optimizer.state.get(p)
            if st and "step" in st:
                st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 flat partitions the inner optimizer steps (ZeRO-3 lists them in param_groups only
        during its step)."""
        flats = getattr(self.zero_optimizer, "fp32_partitioned_groups_flat", None)
        if flats:
            return list(flats)
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _init_optimizer_state(self) -> None:
        """Create AdamW's moments (zeros) on ZeRO's flat fp32 partitions before the first step, so that
        loaded moments have somewhere to go (torch's AdamW only initialises state it does not find)."""
        for p in self._flat_partitions():
            if not self.optimizer.state.get(p):
                self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
        link = getattr(self.zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2: point each parameter's fragment map at the new state
            self.zero_optimizer._hp_optimizer_states_linked = False
            link()

    def full_model_state_dict(self) -> dict:
        return self.state_dict()["model"]

    def save_native(self, path: str, tag: str | None = None) -> None:
        self.ds.save_checkpoint(path, tag=tag)

    def load_native(self, path: str, tag: str | None = None) -> None:
        self.ds.load_checkpoint(path, tag=tag)


class ZeroEMA:
    """Exponential moving average of ZeRO-3-partitioned parameters (same interface as ``training.ema.EMA``).

    Each rank averages only its own partition of every fp32 master weight (``safe_get_local_fp32_param``):
    1/world of the model per rank, no communication per update. ``state_dict`` gathers full tensors by
    published name (collective; identical on every rank, like ``ZeroEngine.state_dict``), so checkpoints and
    ``lcv-export --weights ema`` read it like any other EMA, and ``load_state_dict`` keeps this rank's slice.
    ``swapped_in`` writes the averages into the module's partitions (and into the whole tensors ZeRO keeps
    resident for small "persistent" parameters), so forwards inside it gather the EMA weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        from deepspeed.utils import safe_get_local_fp32_param

        from parallel.parallelize import canonical_name

        self.decay = decay
        self.params = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: safe_get_local_fp32_param(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        names = list(self.params)
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [safe_get_local_fp32_param(self.params[n]).detach().float() for n in names],
                             1.0 - self.decay)

    def _full(self, name: str) -> torch.Tensor:
        import torch.distributed as dist

        p, part = self.params[name], self.shadow[name]
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part.contiguous())
        return torch.cat([t.reshape(-1) for t in parts])[: p.ds_numel].view(p.ds_shape)

    def _local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        n = self.shadow[name].numel()
        flat = torch.zeros(n * dist.get_world_size(), dtype=torch.float32, device=full.device)
        flat[: full.numel()] = full.reshape(-1).float()
        return flat[dist.get_rank() * n:(dist.get_rank() + 1) * n]

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily make the module compute with the EMA weights (for sampling)."""
        backup = {}
        with torch.no_grad():
            for n, p in self.params.items():
                backup[n] = (p.ds_tensor.detach().clone(), p.data.detach().clone() if p.data.numel() else None)
                p.ds_tensor.copy_(self.shadow[n].view_as(p.ds_tensor).to(p.ds_tensor.dtype))
                if p.data.numel():  # resident whole (persistent small parameter)
                    p.data.copy_(self._full(n).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    part, whole = backup[n]
                    p.ds_tensor.copy_(part)
                    if whole is not None:
                        p.data.copy_(whole)

    def state_dict(self) -> dict:
        return {n: self._full(n) for n in self.params}

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(self._local(n, sd[n].to(t.device)))


def zero3_init(cfg, dims):
    """The context in which modules are built already partitioned over the ranks (ZeRO-3), in fp32 (the
    engine makes the bf16 compute copy and keeps these as master weights). Pair with ``fill_zero3``."""
    import torch.distributed as dist

    ds = _deepspeed()
    if not ds.comm.is_initialized():  # DeepSpeed's view of the process group we already made (its config needs it)
        ds.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False,
                                 verbose=False)
    config = build_ds_config(cfg, {}, grad_clip=0.0, world_size=dims.world_size, device=dims.device)
    # fp32 partitions, as a module built whole would have; ``deepspeed.initialize`` then makes the bf16 copy.
    # (Through the config: Init's ``dtype`` argument is overridden where the accelerator lacks fp16, e.g. CPU.)
    config["bf16"] = {"enabled": False}
    return ds.zero.Init(config_dict_or_path=config)


@torch.no_grad()
def fill_zero3(model: torch.nn.Module, full_value) -> None:
    """Set every parameter of a ZeRO-3-partitioned ``model``, one whole tensor at a time: rank 0 calls
    ``full_value(name, param)`` (plain model name; the param gathered whole) and DeepSpeed hands each rank its
    partition. Other ranks never call it, so rank 0 alone may hold the source (e.g. the published weights)."""
    import torch.distributed as dist

    from parallel.parallelize import canonical_name

    ds = _deepspeed()
    for name, p in model.named_parameters():
        with ds.zero.GatheredParameters([p], modifier_rank=0):
            if dist.get_rank() == 0:
                p.data.copy_(full_value(canonical_name(name), p))
