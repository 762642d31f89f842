"""Training engines: what turns a loss into an optimizer step, for each parallel layout.

The trainer only talks to this interface: ``backward(loss)``, ``step() -> grad norm``, ``autocast()``,
``state_dict()`` / ``load_state_dict()`` (model + optimizer, in a form DCP saves sharded and can load on
a different world size), and ``model`` / ``optimizer``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)


class TorchEngine:
    """Plain PyTorch (one process) and FSDP2 (the model arrives already sharded by ``parallelize_model``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, device: torch.device | None = None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.device = device or torch.device("cpu")

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip and self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def full_model_state_dict(self) -> dict:
        """Unsharded model weights on CPU (collective under FSDP: call on every rank)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
