"""Context parallelism for the DiT: the token grid is sharded along H over a cp process group.

``apply_context_parallel(model, group_or_mesh, mode="ring"|"ulysses")`` swaps ``model.attention_op`` for
``RingAttentionOp`` (K/V shards circulate; dense or block-sparse with globally consistent block selection)
or ``UlyssesAttentionOp`` (all-to-all heads <-> sequence around the single-process operator).
``split_tokens`` / ``gather_tokens`` move tokens between the full and sharded layouts with gradients;
their gradient convention (average parameter gradients over the cp group) is documented in ``comm.py``.
"""

from parallel.context_parallel.comm import all_to_all, gather_tokens, split_tokens
from parallel.context_parallel.ops import (RingAttentionOp, UlyssesAttentionOp, apply_context_parallel,
                                           make_context_parallel_op, resolve_cp_group)
from parallel.context_parallel.ring import bsa_ring_attention, dense_ring_attention, ring_attention

__all__ = ["RingAttentionOp", "UlyssesAttentionOp", "all_to_all", "apply_context_parallel", "bsa_ring_attention",
           "dense_ring_attention", "gather_tokens", "make_context_parallel_op", "resolve_cp_group",
           "ring_attention", "split_tokens"]
