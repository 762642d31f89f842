"""A training stage owns its step.

The trainer owns the loop, data, checkpoints, metrics, signals and sampling hooks. A stage:

- ``prepare(model)``: before parallelisation, freezes what does not train or adds adapters (LoRA);
- ``initial_parameter(name, shape, seed, device, dtype)``: how parameters absent from the starting weights
  (a new adapter) are initialised, as a function of seed and name only so that every layout agrees;
- ``step(ctx)``: one training step given a ``StepContext`` (model, engine, encoders, dims, generator, the
  next micro-batch, and ``optimizer_step(loss)``, which steps engine, lr schedule and EMA together and
  returns the step's metrics); it returns the metrics to log (every key is logged);
- ``state_dict`` / ``load_state_dict``: its own state, saved with the rest of the checkpoint.

Stages are found through a registry: ``@register_stage("flow_matching", FlowMatchingStageConfig)``;
``stage.kind`` picks the class, and the rest of the ``stage:`` section is validated by that stage's config
dataclass (a subclass of ``StageConfig``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcv_train.errors import ConfigError, require


@dataclass
class StageConfig:
    """What every stage has: its name (checkpoints and logs say it), its kind (the registry key), and
    which parameters train. Task mix and buckets are data config (``conf/stage/*.yaml`` sets them too)."""

    name: str = "video_pretrain"
    kind: str = "flow_matching"
    trainable: str = "all"  # all | a regex over parameter names

    def validate(self) -> "StageConfig":
        require(self.kind in _REGISTRY, "stage.kind", f"must be one of {', '.join(sorted(_REGISTRY))}, got {self.kind!r}")
        return self

    def check_train_config(self, train_cfg) -> None:
        """Checks that need other sections of the config (a stage that needs ``lora.rank``); called by
        ``TrainConfig.validate`` after every section validated itself. Raises ``ConfigError``."""


@dataclass
class StageBatch:
    latents: torch.Tensor  # [B, C, T, H, W], normalized
    text: torch.Tensor  # [B, L, D]
    text_mask: torch.Tensor  # [B, L] bool
    num_cond: int  # condition latent frames (first along T)
    pixels: torch.Tensor | None = None  # the loader's uint8 video [B, 3, F, H, W] when the shards hold pixels
    captions: list[str] | None = None  # the batch's captions when the shards hold them (GRPO prompts)


@dataclass
class StepContext:
    """What a stage's ``step`` may use. Built by the trainer for every step."""

    step: int  # the step being taken (1-based)
    model: torch.nn.Module  # parallelised (FSDP / ZeRO / TP wrappers)
    core_model: torch.nn.Module  # the LongCatDiT inside
    engine: Any  # parallel.engine: autocast(), backward(loss)
    dims: Any  # parallel.dims.ParallelDims
    device: torch.device
    codec: Any  # lcv_train.encoders video codec
    text_encoder: Any
    generator: torch.Generator  # noise: differs across data-parallel replicas, equal within one
    grad_accum: int
    next_batch: Callable[[], StageBatch]  # the next micro-batch, encoded (counts data wait and tokens)
    optimizer_step: Callable[[torch.Tensor], dict]  # loss (this rank's mean, on device) -> step metrics
    phase: Callable[[str], None]  # tell the watchdog which phase runs ("forward", "backward", ...)
    run_dir: Path | None = None  # the run's folder (a stage's own files, e.g. videos to log)


class Stage(abc.ABC):
    """Base class; see the module docstring."""

    def __init__(self, cfg: StageConfig, train_cfg):
        self.cfg = cfg
        self.name = cfg.name
        self.train_cfg = train_cfg
        lora = getattr(train_cfg, "lora", None)
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

    def initial_parameter(self, name: str, shape, seed: int, device, dtype) -> torch.Tensor:
        """A parameter the starting weights do not hold (every parameter of a fresh run, an added adapter)."""
        from lcv_train.model.dit import initial_parameter

        return initial_parameter(name, shape, seed, device, dtype)

    def model_ready(self, model: torch.nn.Module) -> None:
        """Called once per start with the parallelised model holding its starting weights (``init_from`` or the
        seed's), before a checkpoint is loaded over them (a stage that keeps them, e.g. as a reference)."""

    @abc.abstractmethod
    def step(self, ctx: StepContext) -> dict:
        """One training step; returns the metrics to log (floats, ints, or ``LoggedVideo`` from
        ``lcv_train.training.metrics``; every key is logged)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


_REGISTRY: dict[str, tuple[type[Stage], type[StageConfig]]] = {}


def register_stage(kind: str, config_cls: type[StageConfig] = StageConfig):
    """Class decorator: ``@register_stage("flow_matching", FlowMatchingStageConfig)``."""

    def deco(cls: type[Stage]) -> type[Stage]:
        _REGISTRY[kind] = (cls, config_cls)
        return cls

    return deco


def stage_kinds() -> list[str]:
    return sorted(_REGISTRY)


def stage_config_class(kind: str) -> type[StageConfig]:
    if kind not in _REGISTRY:
        raise ConfigError(f"stage.kind: must be one of {', '.join(sorted(_REGISTRY))}, got {kind!r}")
    return _REGISTRY[kind][1]


def build_stage(cfg: StageConfig, train_cfg) -> Stage:
    cls, config_cls = _REGISTRY[cfg.kind] if cfg.kind in _REGISTRY else (None, None)
    if cls is None:
        stage_config_class(cfg.kind)  # raises naming the known kinds
    if not isinstance(cfg, config_cls):
        raise ConfigError(f"stage: kind {cfg.kind!r} needs a {config_cls.__name__}, got {type(cfg).__name__}")
    return cls(cfg, train_cfg)
