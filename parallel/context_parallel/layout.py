"""Where each context-parallel rank's tokens live: an ``ch x cw`` tiling of every frame's H x W patch grid.

Rank ``r`` holds tile ``(r // cw, r % cw)`` of every frame: rows ``[i*th, (i+1)*th)`` and columns
``[j*tw, (j+1)*tw)``. T is never split, so the model's condition/noisy split along T stays local. Grids
whose sizes do not divide are padded at their bottom and right edges up to ``(ch*th, cw*tw)``, every tile
having the same size (collectives need equal shapes) and being a multiple of ``unit`` (the BSA block's
``(bh, bw)`` for block-sparse ring attention, so a rank holds whole 3D blocks; ``(1, 1)`` otherwise).

Padded tokens are computed by the per-token layers like real ones, but attention never uses them as keys,
block selection never pools them, and ``gather`` drops them, so outputs and gradients equal those of the
unpadded grid on one process. Their cost is ``padding_fraction`` of the attention and MLP work.

``choose_layout`` picks the split with the least padding (ties: more rows split, i.e. the plain H split
when it divides) unless one is given (``parallel.cp_split_hw``). With BSA blocks of 4: 480p (30 x 52
patches) at cp=4 gives 4 x 1 tiles of 8 x 52; 720p (45 x 80) at cp=8 gives 4 x 2 tiles of 12 x 40; both pad
6.25% (the rows single-process BSA pads too). Dense attention splits 30 x 52 at cp=4 into 2 x 2 tiles of
15 x 26 with no padding.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

from lcv_train.errors import ConfigError


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class ShardLayout:
    height: int  # full grid rows (patch units)
    width: int  # full grid columns
    split: tuple[int, int]  # (ch, cw): tiles along H and W; ch * cw = cp
    unit: tuple[int, int] = (1, 1)  # each tile's height/width is a multiple of these

    @property
    def cp(self) -> int:
        return self.split[0] * self.split[1]

    @property
    def tile(self) -> tuple[int, int]:
        """(th, tw): every rank's tile size, padding included."""
        (ch, cw), (uh, uw) = self.split, self.unit
        return _ceil_to(-(-self.height // ch), uh), _ceil_to(-(-self.width // cw), uw)

    @property
    def padded(self) -> tuple[int, int]:
        th, tw = self.tile
        return self.split[0] * th, self.split[1] * tw

    @property
    def padding_fraction(self) -> float:
        """Share of the sharded tokens that are padding."""
        ph, pw = self.padded
        return 1.0 - (self.height * self.width) / (ph * pw)

    def coords(self, rank: int) -> tuple[int, int]:
        """(i, j): the tile row and column rank ``rank`` holds."""
        return divmod(rank, self.split[1])

    def offset(self, rank: int) -> tuple[int, int]:
        """Full-grid (row, column) of the tile's first token."""
        i, j = self.coords(rank)
        th, tw = self.tile
        return i * th, j * tw

    def valid(self, rank: int) -> tuple[int, int]:
        """(rows, cols) of real tokens in the rank's tile; the rest of the tile is padding. May be 0."""
        (r0, c0), (th, tw) = self.offset(rank), self.tile
        return max(0, min(th, self.height - r0)), max(0, min(tw, self.width - c0))

    def describe(self) -> str:
        th, tw = self.tile
        return (f"{self.height}x{self.width} tokens per frame as {self.split[0]}x{self.split[1]} tiles of {th}x{tw}, "
                f"padding {100 * self.padding_fraction:.1f}%")


def tile_unit(attention: str, cp_mode: str, block_shape, kv_block_shape=None) -> tuple[int, int]:
    """What every tile's height and width must be a multiple of: whole 3D blocks (``block_shape``'s H and W,
    and ``kv_block_shape``'s when the key blocks differ: their lcm) when block-sparse ring attention works on
    the tiles themselves; ``(1, 1)`` for dense attention and for Ulysses, which runs the single-process
    operator on the gathered full grid. Images (T = 1) attend densely but share the video layout, so the
    unit does not depend on T."""
    if attention == "bsa" and cp_mode == "ring":
        kv_block_shape = block_shape if kv_block_shape is None else kv_block_shape
        return (math.lcm(int(block_shape[1]), int(kv_block_shape[1])),
                math.lcm(int(block_shape[2]), int(kv_block_shape[2])))
    return 1, 1


def _splits(cp: int):
    return [(ch, cp // ch) for ch in range(cp, 0, -1) if cp % ch == 0]


def choose_layout(height: int, width: int, cp: int, unit: tuple[int, int] = (1, 1),
                  split: tuple[int, int] | list[int] | None = None) -> ShardLayout:
    """The layout of a ``height x width`` grid over ``cp`` ranks: ``split`` when given, else the least padding."""
    unit = (int(unit[0]), int(unit[1]))
    if split is not None:
        split = tuple(int(s) for s in split)
        if len(split) != 2 or min(split) < 1 or split[0] * split[1] != cp:
            raise ConfigError(f"parallel.cp_split_hw={list(split)} must be two positive ints whose product is "
                              f"parallel.cp={cp}, or null to choose the split with the least padding")
        return ShardLayout(height, width, split, unit)
    layouts = [ShardLayout(height, width, s, unit) for s in _splits(cp)]
    return min(layouts, key=lambda lay: lay.padded[0] * lay.padded[1])  # min keeps the first (most rows) on ties
