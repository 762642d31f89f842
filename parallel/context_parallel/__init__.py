"""Context parallelism for the DiT: every frame's token grid is cut into H x W tiles over a cp process group.

``apply_context_parallel(model, group_or_mesh, mode="ring"|"ulysses")`` swaps ``model.attention_op`` for
``RingAttentionOp`` (K/V shards circulate; dense or block-sparse with globally consistent block selection)
or ``UlyssesAttentionOp`` (all-to-all heads <-> sequence around the single-process operator).
``ShardLayout`` / ``choose_layout`` (``layout.py``) say which tile each rank holds (padded when the grid does
not divide); ``split_grid`` / ``gather_grid`` move tokens between the full grid and the tiles with
gradients; their gradient convention (average parameter gradients over the cp group) is documented in ``comm.py``.
"""

from parallel.context_parallel.comm import all_to_all, gather_grid, split_grid
from parallel.context_parallel.layout import ShardLayout, choose_layout
from parallel.context_parallel.ops import (RingAttentionOp, UlyssesAttentionOp, apply_context_parallel,
                                           make_context_parallel_op, resolve_cp_group)
from parallel.context_parallel.ring import bsa_ring_attention, dense_ring_attention, ring_attention

__all__ = ["RingAttentionOp", "ShardLayout", "UlyssesAttentionOp", "all_to_all", "apply_context_parallel",
           "bsa_ring_attention", "choose_layout", "dense_ring_attention", "gather_grid", "make_context_parallel_op",
           "resolve_cp_group", "ring_attention", "split_grid"]
