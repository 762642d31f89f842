"""The training job's configuration: dataclasses for every section, built from the Hydra-composed tree
and validated once at start-up. Every error names the key and the constraint (``optim.lr: must be > 0``).

Defaults: ``conf/train.yaml`` spells out every key of the sections it owns (run, diffusion, optim,
schedule, ema, trainer, synthetic, lora, sample) with exactly the defaults of the dataclasses below
(``tests/training/test_config_defaults.py`` fails when one differs); the config groups (model, data, vae,
text_encoder, parallel, stage, logger) are choices with their own files.

Sections owned elsewhere are validated by their owners: ``data`` (``data_loaders.DataConfig``),
``vae`` / ``text_encoder`` (``lcv_train.encoders``), ``parallel`` (``parallel.ParallelConfig``),
``model`` (``lcv_train.model.DiTConfig``), ``diffusion`` (``FlowMatchingConfig``), ``stage`` (the config class of its kind, ``lcv_train.stages``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from conf.parsing import from_mapping
from lcv_train.diffusion import FlowMatchingConfig
from lcv_train.errors import require
from lcv_train.eval.config import EvalConfig
from lcv_train.lora import LoRAConfig
from lcv_train.model.config import DiTConfig
from lcv_train.sampling import SamplerConfig
from lcv_train.stages import StageConfig, stage_config_class
from parallel.config import ParallelConfig


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "outputs"  # the run directory is <root>/<name>
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0

    def validate(self) -> "OptimConfig":
        for key in ("lr", "weight_decay", "eps", "grad_clip"):
            value = getattr(self, key)
            require(math.isfinite(value), f"optim.{key}", f"must be a finite number, got {value}")
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        return self


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def validate(self) -> "ScheduleConfig":
        require(self.kind in ("cosine", "constant", "linear"), "schedule.kind",
              f"must be cosine|constant|linear, got {self.kind!r}")
        require(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        return self


@dataclass
class EMAConfig:
    decay: float = 0.99  # 0 disables EMA
    every: int = 1

    def validate(self) -> "EMAConfig":
        require(0 <= self.decay < 1, "ema.decay", f"must be in [0, 1), got {self.decay}")
        require(self.every >= 1, "ema.every", f"must be >= 1, got {self.every}")
        return self


@dataclass
class TrainerConfig:
    max_steps: int = 300
    grad_accum: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in the run dir, else fresh) | none | <checkpoint dir>
    device: str = "auto"  # auto | cpu | cuda
    sample_at_end: bool = True
    sample_every: int = 0  # also write a sample every k steps (0: only at the end)
    # Start from: a published LongCat-Video folder (or its dit/), one of our run directories (its latest
    # checkpoint) or a step_N checkpoint; init_weights picks a checkpoint's ema or model weights.
    init_from: str | None = None
    init_weights: str = "ema"
    skip_nonfinite_steps: int = 3  # NaN/inf loss or grad norm: skip up to this many steps in a row, then stop
    # Several ranks: a step phase (forward, backward, optimizer, ...) that lasts longer than this ends the
    # attempt with a line naming the step and the phase; saves, samples and each attempt's first step get
    # save_timeout_s (lcv_train/training/watchdog.py).
    collective_timeout_s: float = 300.0
    save_timeout_s: float = 1800.0

    def validate(self) -> "TrainerConfig":
        require(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.grad_accum >= 1, "trainer.grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(self.log_every >= 1, "trainer.log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 1, "trainer.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        require(self.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {self.keep_last}")
        require(self.skip_nonfinite_steps >= 0, "trainer.skip_nonfinite_steps",
                f"must be >= 0 (0 = stop at the first non-finite step), got {self.skip_nonfinite_steps}")
        require(self.sample_every >= 0, "trainer.sample_every", f"must be >= 0 (0 = off), got {self.sample_every}")
        require(self.init_weights in ("ema", "model"), "trainer.init_weights",
                f"must be ema|model, got {self.init_weights!r}")
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device", f"must be auto|cpu|cuda, got {self.device!r}")
        require(self.collective_timeout_s > 0, "trainer.collective_timeout_s", f"must be > 0, got {self.collective_timeout_s}")
        require(self.save_timeout_s >= self.collective_timeout_s, "trainer.save_timeout_s",
                f"must be >= trainer.collective_timeout_s ({self.collective_timeout_s}), got {self.save_timeout_s}")
        return self


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "lcv-train"
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled

    def validate(self) -> "LoggerConfig":
        require(self.kind in ("wandb", "none"), "logger.kind", f"must be wandb|none, got {self.kind!r}")
        require(self.mode in ("auto", "online", "offline", "disabled"), "logger.mode",
              f"must be auto|online|offline|disabled, got {self.mode!r}")
        return self


@dataclass
class SyntheticDataConfig:
    """The embedded default's dataset: made on first use, then read as ordinary shards."""

    enabled: bool = False
    dir: str = "~/.cache/lcv_train/synthetic"
    n: int = 512
    frames: int = 9
    height: int = 32
    width: int = 32
    fps: float = 8.0
    seed: int = 0


@dataclass
class SampleConfig(SamplerConfig):
    """The samples written during training: the embedded default's few steps and weak guidance (the
    sampler's own defaults are the published inference settings, SPEC section 9)."""

    steps: int = 30
    shift: float = 3.0
    guidance: float = 3.0
    captions: list[str] = field(default_factory=lambda: ["a red circle moves to the right", "a blue square moves up"])
    frames: int = 9
    height: int = 32
    width: int = 32
    fps: float = 8.0


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    diffusion: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # measured quality during training (lcv_train/eval)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=0))  # rank 0: no LoRA
    # Validated by their owners (data_loaders, lcv_train.encoders).
    data: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        self.model.validate()
        self.diffusion.validate()
        for part in (self.optim, self.schedule, self.ema, self.trainer, self.stage, self.logger):
            part.validate()
        self.parallel.validate()
        require(self.sample.steps >= 1, "sample.steps", f"must be >= 1, got {self.sample.steps}")
        self.eval.validate()
        require(isinstance(self.lora.rank, int) and self.lora.rank >= 0, "lora.rank", "must be >= 0 (0 = no LoRA)")
        if self.lora.rank:
            self.lora.validate()
            require(self.parallel.engine == "fsdp" and self.parallel.tp == 1, "lora.rank",
                    f"LoRA runs need parallel.engine=fsdp and parallel.tp=1 (got engine={self.parallel.engine}, "
                    f"tp={self.parallel.tp}): ZeRO and tensor parallelism are not supported with LoRA")
            require(self.stage.trainable == "all", "stage.trainable",
                    f"must be all with lora.rank > 0 (LoRA trains only its adapters), got {self.stage.trainable!r}")
        self.stage.check_train_config(self)
        return self


def train_config_from_dict(d: dict) -> TrainConfig:
    """The validated ``TrainConfig`` of a composed (resolved, plain-container) Hydra config. The ``stage``
    section is validated by the config class its ``kind`` registers (``lcv_train.stages``)."""
    d = dict(d)
    stage = d.get("stage")
    if isinstance(stage, dict):
        kind = stage.get("kind", StageConfig.kind)
        d["stage"] = from_mapping(stage_config_class(kind), stage, "stage")
    return from_mapping(TrainConfig, d).validate()
