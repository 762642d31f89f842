"""The DiT's parallelisation plan: what ``parallel``'s generic mechanics shard and how.

- FSDP2: one group per block (``blocks``), bottom-up, then the root; the parts SPEC section 1 keeps in fp32
  (the timestep embedder, each block's AdaLN modulation, the final layer) get their own fp32 groups; the
  patch and caption embedders cast their inputs.
- Tensor parallelism (Megatron's attention/MLP split, heads divided across ranks): self-attention ``qkv``
  column-parallel by heads (3 fused parts), ``proj`` row-parallel; cross-attention ``q_linear`` (1 part) and
  ``kv_linear`` (2 parts) column-parallel by heads, ``proj`` row-parallel; FFN ``w1``, ``w3`` column-parallel,
  ``w2`` row-parallel. The per-head QK norms see only a rank's heads: their gradients are partial.
"""

from __future__ import annotations

from parallel.plan import ParallelPlan, TPLinear

DIT_PLAN = ParallelPlan(
    blocks="blocks",
    fsdp_fp32=("t_embedder",),
    fsdp_output="final_layer",
    block_fp32=("adaLN_modulation",),
    fsdp_inputs=("x_embedder", "y_embedder"),
    tp_linears=(
        TPLinear("attn.qkv", "column", head_parts=3),
        TPLinear("attn.proj", "row"),
        TPLinear("cross_attn.q_linear", "column", head_parts=1),
        TPLinear("cross_attn.kv_linear", "column", head_parts=2),
        TPLinear("cross_attn.proj", "row"),
        TPLinear("ffn.w1", "column"),
        TPLinear("ffn.w3", "column"),
        TPLinear("ffn.w2", "row"),
    ),
    tp_attention=("attn", "cross_attn"),
    tp_partial_grads=("attn.q_norm", "attn.k_norm", "cross_attn.q_norm", "cross_attn.k_norm"),
)


def dit_parallel_plan() -> ParallelPlan:
    return DIT_PLAN
