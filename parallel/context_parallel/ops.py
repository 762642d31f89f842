"""Context-parallel attention operators for the DiT, and ``apply_context_parallel``.

Both operators shard every frame's H x W token grid into ``ch x cw`` tiles, one per rank (``layout.py``:
padded when the sizes do not divide, whole 3D blocks for block-sparse ring attention), so the
condition/noisy split along T stays local and each of the model's ``self_attention`` calls (condition
queries over condition keys, noisy queries over all keys) is context-parallel on its own. The grids the
model passes are the full ones; the operator derives the tiles from them.

* ``RingAttentionOp``: queries stay put, K/V shards circulate (``ring.py``); dense or block-sparse.
* ``UlyssesAttentionOp``: all-to-all from (local tokens, all heads) to (all tokens, heads/cp), the single-
  process operator on the full grid, and back. Needs ``heads % cp == 0``.

Text cross-attention is local (text is replicated). Gradients follow ``comm.py``'s convention: average
parameter gradients over the cp group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lcv_train.errors import ConfigError
from kernels.attention_op import AttentionOp, BlockSparseAttentionOp, Grid, uses_block_sparse
from parallel.context_parallel.comm import all_to_all, gather_grid, group_rank, group_size, split_grid
from parallel.context_parallel.layout import ShardLayout, choose_layout, tile_unit
from parallel.context_parallel.ring import bsa_ring_attention, dense_ring_attention

_INNER = ("dense", "bsa")


class _ContextParallelOp(AttentionOp):
    """Shared by both modes. ``group``: the cp process group (None = WORLD; one rank = plain attention).
    ``inner``: "dense" or "bsa"; the BSA settings (``sparsity``, ``block_shape``, ``kv_block_shape``,
    ``cdf_threshold``, ``fp32_scores``, ``backend`` of ``kernels.bsa``) mean what they mean for
    ``BlockSparseAttentionOp``; ``dense_backend``
    is the ``kernels.attention`` backend of the dense ring steps; ``split_hw`` fixes the ``(ch, cw)`` tiling
    (None: the least padding, per grid). ``name`` is the inner kind, as for the single-process operators;
    ``cp_mode`` is "ring" or "ulysses"."""

    cp_mode = ""

    def __init__(self, group: ProcessGroup | None, inner: str = "dense", *, sparsity: float = 0.9375,
                 block_shape: Grid = (4, 4, 4), cdf_threshold: float | None = None, backend: str = "auto",
                 dense_backend: str = "auto", split_hw=None, kv_block_shape: Grid | None = None,
                 fp32_scores: bool = False):
        if inner not in _INNER:
            raise ConfigError(f"model.attention must be one of {_INNER} under context parallelism, got {inner!r}")
        self.group = group
        self.cp = group_size(group)
        self.rank = group_rank(group)
        self.name = inner
        self.sparsity = sparsity
        self.block_shape = tuple(int(b) for b in block_shape)
        self.kv_block_shape = tuple(int(b) for b in kv_block_shape) if kv_block_shape is not None else self.block_shape
        self.cdf_threshold = cdf_threshold
        self.fp32_scores = fp32_scores
        self.backend = backend
        self.dense_backend = dense_backend
        self.split_hw = tuple(int(s) for s in split_hw) if split_hw is not None else None
        if self.split_hw is not None:
            choose_layout(1, 1, self.cp, split=self.split_hw)  # a bad split fails now, not at the first step

    # -- token layout ---------------------------------------------------------------------------
    def layout(self, height: int, width: int) -> ShardLayout:
        """How a full ``height x width`` token grid is tiled over the cp ranks."""
        unit = tile_unit(self.name, self.cp_mode, self.block_shape, self.kv_block_shape)
        return choose_layout(height, width, self.cp, unit, self.split_hw)

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return split_grid(x, self.layout(x.shape[2], x.shape[3]), self.group)

    def gather_tokens(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return gather_grid(x, self.layout(grid[1], grid[2]), self.group)

    def _use_bsa(self, kv_grid: Grid, clip_frames: int | None) -> bool:
        # Same rule as BlockSparseAttentionOp: block-sparse unless the clip has one frame.
        return self.name == "bsa" and uses_block_sparse(clip_frames, kv_grid)

    def inner_op(self) -> AttentionOp:
        """The single-process operator this one distributes."""
        if self.name == "bsa":
            return BlockSparseAttentionOp(self.sparsity, self.block_shape, self.cdf_threshold, self.backend,
                                          self.kv_block_shape, self.fp32_scores)
        return AttentionOp()

    def __repr__(self) -> str:
        split = f", split_hw={self.split_hw}" if self.split_hw else ""
        return f"{type(self).__name__}(cp={self.cp}, inner={self.name!r}{split})"


class RingAttentionOp(_ContextParallelOp):
    """Ring attention over the cp group (dense, or block-sparse with globally consistent block selection)."""

    cp_mode = "ring"

    def self_attention(self, q, k, v, q_grid, kv_grid, clip_frames=None):
        layout = self.layout(q_grid[1], q_grid[2])
        if self._use_bsa(kv_grid, clip_frames):
            return bsa_ring_attention(q, k, v, q_grid, kv_grid, self.group, layout, self.block_shape, self.sparsity,
                                      self.cdf_threshold, self.backend, kv_block_shape=self.kv_block_shape,
                                      fp32_scores=self.fp32_scores)
        return dense_ring_attention(q, k, v, self.group, backend=self.dense_backend, layout=layout)


class UlyssesAttentionOp(_ContextParallelOp):
    """All-to-all (heads <-> sequence) around the single-process operator; needs heads % cp == 0."""

    cp_mode = "ulysses"

    def _to_full(self, x: torch.Tensor, grid: Grid, layout: ShardLayout) -> torch.Tensor:
        """``[B, T*th*tw, heads, D]`` local tile -> ``[B, T*H*W, heads/cp, D]`` in full-grid raster order."""
        B, _, heads, D = x.shape
        if heads % self.cp != 0:
            raise ConfigError(f"parallel.cp_mode=ulysses needs the number of attention heads ({heads}) to be "
                              f"divisible by parallel.cp={self.cp}; use cp_mode=ring or a cp dividing {heads}")
        (ch, cw), (th, tw) = layout.split, layout.tile
        T = grid[0]
        x = all_to_all(x, 2, 1, self.group)  # sequence is now rank-major: [ch, cw, T, th, tw]
        x = x.view(B, ch, cw, T, th, tw, heads // self.cp, D).permute(0, 3, 1, 4, 2, 5, 6, 7)
        x = x.reshape(B, T, ch * th, cw * tw, heads // self.cp, D)[:, :, :layout.height, :layout.width]
        return x.reshape(B, T * layout.height * layout.width, heads // self.cp, D)

    def _to_local(self, x: torch.Tensor, grid: Grid, layout: ShardLayout) -> torch.Tensor:
        B, _, hh, D = x.shape
        (ch, cw), (th, tw), (ph, pw) = layout.split, layout.tile, layout.padded
        T, H, W = grid
        x = x.view(B, T, H, W, hh, D)
        if (ph, pw) != (H, W):
            padded = x.new_zeros(B, T, ph, pw, hh, D)
            padded[:, :, :H, :W] = x
            x = padded
        x = x.view(B, T, ch, th, cw, tw, hh, D).permute(0, 2, 4, 1, 3, 5, 6, 7).reshape(B, self.cp * T * th * tw, hh, D)
        return all_to_all(x, 1, 2, self.group)

    def self_attention(self, q, k, v, q_grid, kv_grid, clip_frames=None):
        layout = self.layout(q_grid[1], q_grid[2])
        qf = self._to_full(q, q_grid, layout)
        kf, vf = self._to_full(k, kv_grid, layout), self._to_full(v, kv_grid, layout)
        # built at every call from this operator's settings, so a changed sparsity (sparse_ft's warm-up) applies
        out = self.inner_op().self_attention(qf, kf, vf, q_grid, kv_grid, clip_frames)
        return self._to_local(out, q_grid, layout)


_MODES = {"ring": RingAttentionOp, "ulysses": UlyssesAttentionOp}


def resolve_cp_group(group_or_mesh) -> ProcessGroup:
    """A ProcessGroup, a 1-D DeviceMesh, or a DeviceMesh with a ``"cp"`` dimension -> the cp ProcessGroup."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group_or_mesh, DeviceMesh):
        if group_or_mesh.ndim == 1:
            return group_or_mesh.get_group()
        names = group_or_mesh.mesh_dim_names or ()
        if "cp" not in names:
            raise ValueError(f"apply_context_parallel: device mesh has dims {names}; expected a 'cp' dimension")
        return group_or_mesh.get_group("cp")
    if group_or_mesh is None:
        return dist.group.WORLD
    return group_or_mesh


def make_context_parallel_op(inner_op: AttentionOp, group: ProcessGroup, mode: str = "ring",
                             split_hw=None) -> _ContextParallelOp:
    """The context-parallel version of a single-process operator (dense ``AttentionOp`` or
    ``BlockSparseAttentionOp``), keeping its sparsity settings; ``split_hw`` as for the operators."""
    if mode not in _MODES:
        raise ConfigError(f"parallel.cp_mode must be one of {sorted(_MODES)}, got {mode!r}")
    if isinstance(inner_op, _ContextParallelOp):
        raise ValueError(f"attention operator {inner_op!r} is already context-parallel")
    if getattr(inner_op, "name", None) == "bsa":
        return _MODES[mode](group, "bsa", sparsity=inner_op.sparsity, block_shape=inner_op.block_shape,
                            cdf_threshold=inner_op.cdf_threshold, backend=inner_op.backend, split_hw=split_hw,
                            kv_block_shape=inner_op.kv_block_shape, fp32_scores=inner_op.fp32_scores)
    if type(inner_op) is AttentionOp or getattr(inner_op, "name", None) == "dense":
        return _MODES[mode](group, "dense", split_hw=split_hw)
    raise ValueError(f"apply_context_parallel: unknown attention operator {inner_op!r} (name "
                     f"{getattr(inner_op, 'name', None)!r}); expected 'dense' or 'bsa'")


def apply_context_parallel(model, group_or_mesh=None, mode: str = "ring", split_hw=None):
    """Swap ``model.attention_op`` for its context-parallel version over ``group_or_mesh`` (in place).

    The model then shards its token grid into H x W tiles right after patchify (``split_hw``: the tiling,
    None for the least padding) and gathers it before unpatchify; parameters stay replicated. Average
    parameter gradients over the cp group (see ``comm.py``).
    """
    group = resolve_cp_group(group_or_mesh)
    model.attention_op = make_context_parallel_op(model.attention_op, group, mode, split_hw)
    return model
