"""Training stages (small objects; see ``base.py``)."""

from lcv_train.stages.base import Stage, StageBatch
from lcv_train.stages.flow_matching import FlowMatchingStage


def build_stage(cfg, diffusion_cfg, model_cfg, lora_cfg=None) -> Stage:
    if cfg.kind == "flow_matching":
        return FlowMatchingStage(cfg, diffusion_cfg, model_cfg.patch_size, lora_cfg)
    raise ValueError(f"stage.kind: unknown {cfg.kind!r}")


__all__ = ["FlowMatchingStage", "Stage", "StageBatch", "build_stage"]
