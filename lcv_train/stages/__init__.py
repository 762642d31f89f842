"""Training stages: each owns its step (see ``base.py``); found by ``stage.kind`` through a registry."""

from lcv_train.stages.base import (Stage, StageBatch, StageConfig, StepContext, build_stage, register_stage,
                                   stage_config_class, stage_kinds)
from lcv_train.stages.flow_matching import FlowMatchingStage
from lcv_train.stages.grpo import GRPOConfig, GRPOStage
from lcv_train.stages.refine import RefineStage, RefineStageConfig
from lcv_train.stages.sparse_ft import SparseFineTuneConfig, SparseFineTuneStage, warmup_sparsity

__all__ = ["FlowMatchingStage", "GRPOConfig", "GRPOStage", "RefineStage", "RefineStageConfig", "SparseFineTuneConfig",
           "SparseFineTuneStage", "Stage", "StageBatch", "StageConfig", "StepContext", "build_stage", "register_stage",
           "stage_config_class", "stage_kinds", "warmup_sparsity"]
