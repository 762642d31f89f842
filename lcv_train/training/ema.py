"""Exponential moving average of the trainable weights, with a state_dict DCP saves sharded.

Shadows have the parameters' type and placement (DTensor shards under FSDP2), so the update is local.
``build_ema`` picks ``parallel.zero.ZeroEMA`` for ZeRO-3-partitioned parameters.
"""

from __future__ import annotations

import contextlib

import torch

from parallel.fsdp import reshard_fsdp
from parallel.parallelize import canonical_name


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = model
        self.params = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone().float() if p.is_floating_point() else p.detach().clone()
                       for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        shadows = [self.shadow[n] for n in names]
        current = [self.params[n].detach().to(self.shadow[n].dtype) for n in names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (for sampling or export)."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        reshard_fsdp(self.model)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])
            reshard_fsdp(self.model)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(sd[n])


def build_ema(model: torch.nn.Module, decay: float):
    """The EMA for ``model`` as its engine left it: ``ZeroEMA`` when ZeRO-3 partitions its parameters."""
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        from parallel.zero import ZeroEMA

        return ZeroEMA(model, decay)
    return EMA(model, decay)
