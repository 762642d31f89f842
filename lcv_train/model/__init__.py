"""The LongCat-Video DiT, its config and presets, and its attention operator."""

from lcv_train.model.attention import AttentionOp, BlockSparseAttentionOp, build_attention_op
from lcv_train.model.config import BSAConfig, DiTConfig, PRESETS, preset
from lcv_train.model.dit import ConditionCache, LongCatDiT

__all__ = ["AttentionOp", "BlockSparseAttentionOp", "BSAConfig", "ConditionCache", "DiTConfig", "LongCatDiT",
           "PRESETS", "build_attention_op", "preset"]
