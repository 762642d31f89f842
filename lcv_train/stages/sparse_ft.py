"""The block-sparse attention fine-tune (SPEC sections 4 and 5): the flow-matching step with attention on
video tokens made 3D block-sparse, at the sparsity the attention operator is given at every step.

The stage needs ``model.attention=bsa`` (``conf/stage/sparse_ft.yaml`` sets it, with the published
sparsity 0.9375 and 4x4x4 blocks); the target is ``model.bsa.sparsity``. Beyond the paper, an optional
warm-up ramps the sparsity linearly from dense to the target over the first ``warmup_steps`` steps::

    sparsity(step) = target * min(1, step / warmup_steps)      (step = 1, 2, ...; warmup_steps = 0: target)

At sparsity 0 the top-k rule keeps every key block, which is dense attention. The sparsity is a function
of the step alone, so a resumed run continues the ramp exactly; it is set on the model's attention
operator (``BlockSparseAttentionOp`` or its context-parallel version, which read it at every call) before
each step, and logged as ``train/bsa_sparsity``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcv_train.errors import require
from lcv_train.stages.base import StageConfig, StepContext, register_stage
from lcv_train.stages.flow_matching import FlowMatchingStage


@dataclass
class SparseFineTuneConfig(StageConfig):
    name: str = "sparse_ft"
    kind: str = "sparse_ft"
    warmup_steps: int = 0  # ramp the sparsity from 0 (dense) to model.bsa.sparsity over this many steps

    def validate(self) -> "SparseFineTuneConfig":
        super().validate()
        require(self.warmup_steps >= 0, "stage.warmup_steps", f"must be >= 0 (0 = no warm-up), got {self.warmup_steps}")
        return self

    def check_train_config(self, train_cfg) -> None:
        model = train_cfg.model
        require(model.attention == "bsa", "model.attention",
                f"stage.kind=sparse_ft ({self.name}) fine-tunes block-sparse attention and needs model.attention=bsa "
                f"(conf/stage/sparse_ft.yaml sets it), got {model.attention}")
        require(not self.warmup_steps or model.bsa.sparsity is not None, "stage.warmup_steps",
                "the warm-up ramps the top-k sparsity, but model.bsa.sparsity is null (CDF rule only); set "
                "model.bsa.sparsity or stage.warmup_steps=0")


def warmup_sparsity(step: int, target: float, warmup_steps: int) -> float:
    """The sparsity of step ``step`` (1-based): ``target * min(1, step / warmup_steps)``."""
    if warmup_steps <= 0:
        return float(target)
    return float(target) * min(1.0, step / warmup_steps)


@register_stage("sparse_ft", SparseFineTuneConfig)
class SparseFineTuneStage(FlowMatchingStage):
    def __init__(self, cfg: SparseFineTuneConfig, train_cfg):
        super().__init__(cfg, train_cfg)
        cfg.check_train_config(train_cfg)
        self.target = train_cfg.model.bsa.sparsity  # None: the CDF rule alone, nothing to ramp

    def sparsity_at(self, step: int) -> float | None:
        return None if self.target is None else warmup_sparsity(step, self.target, self.cfg.warmup_steps)

    def step(self, ctx: StepContext) -> dict:
        sparsity = self.sparsity_at(ctx.step)
        if sparsity is not None:
            op = ctx.core_model.attention_op
            if getattr(op, "name", None) != "bsa" or not hasattr(op, "sparsity"):
                raise RuntimeError(f"stage {self.name}: the model's attention operator {op!r} is not block-sparse")
            op.sparsity = sparsity
        metrics = super().step(ctx)
        if sparsity is not None:
            metrics["train/bsa_sparsity"] = sparsity
        return metrics
