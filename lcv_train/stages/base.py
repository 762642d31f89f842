"""A training stage: the small object that says what differs between stages of the same trainer.

The trainer owns the loop, data, optimizer, checkpoints. A stage decides which parameters train
(``prepare``), and turns one batch of latents + text into a loss (``loss``). Task mix and buckets are
data config (``conf/stage/*.yaml`` set them together with the stage).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

import torch

from lcv_train.errors import ConfigError


@dataclass
class StageBatch:
    latents: torch.Tensor  # [B, C, T, H, W], normalized
    text: torch.Tensor  # [B, L, D]
    text_mask: torch.Tensor  # [B, L] bool
    num_cond: int  # condition latent frames (first along T)


class Stage(abc.ABC):
    name: str = "stage"

    def __init__(self, cfg, lora=None):
        self.cfg = cfg
        self.name = cfg.name
        self.lora = lora if lora is not None and lora.rank else None  # a LoRAConfig, or None

    def prepare(self, model: torch.nn.Module) -> None:
        """Before parallelisation: freeze what does not train (``cfg.trainable``: "all" or a regex over
        parameter names), or, with a LoRA config, add the adapters and freeze the base (``lcv_train.lora``)."""
        if self.lora is not None:
            from lcv_train.lora import add_lora

            add_lora(model, self.lora)
            return
        pattern = self.cfg.trainable
        if pattern == "all":
            return
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"stage.trainable: not a valid regex ({e}): {pattern!r}") from e
        n = 0
        for name, p in model.named_parameters():
            p.requires_grad_(bool(rx.search(name)))
            n += p.requires_grad
        if n == 0:
            raise ConfigError(f"stage.trainable: {pattern!r} matches no parameter of the model")

    @abc.abstractmethod
    def loss(self, model, batch: StageBatch, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """The scalar training loss of one micro-batch, and scalar metrics to log."""
