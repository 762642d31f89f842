"""The context-parallel tiling (``parallel/context_parallel/layout.py``) against closed-form counts: every
real token is held by exactly one rank, tiles are equal and whole blocks, the least-padding choice at
LongCat's shapes, and bad splits fail with the key's name."""

from __future__ import annotations

import itertools
import math

import pytest

from lcv_train.errors import ConfigError
from parallel import ParallelConfig
from parallel.context_parallel.layout import ShardLayout, choose_layout, tile_unit


def _owned(layout: ShardLayout, rank: int) -> set[tuple[int, int]]:
    (r0, c0), (vr, vc) = layout.offset(rank), layout.valid(rank)
    return {(r0 + i, c0 + j) for i in range(vr) for j in range(vc)}


@pytest.mark.parametrize("height,width,cp,unit", [(30, 52, 4, (4, 4)), (45, 80, 8, (4, 4)), (5, 3, 4, (2, 2)),
                                                  (7, 7, 6, (1, 1)), (3, 2, 8, (1, 1)), (1, 1, 2, (4, 4))])
def test_every_real_token_is_on_exactly_one_rank(height, width, cp, unit):
    for ch in (d for d in range(1, cp + 1) if cp % d == 0):
        lay = choose_layout(height, width, cp, unit, split=(ch, cp // ch))
        th, tw = lay.tile
        assert th % unit[0] == 0 and tw % unit[1] == 0
        assert lay.padded[0] >= height and lay.padded[1] >= width
        # tile = ceil(H / ch) rounded up to the unit: less than one unit plus one row of padding per tile
        assert lay.padded[0] - height < ch * (unit[0] + 1) and lay.padded[1] - width < (cp // ch) * (unit[1] + 1)
        owned = [_owned(lay, r) for r in range(cp)]
        assert sum(len(o) for o in owned) == height * width
        assert set().union(*owned) == set(itertools.product(range(height), range(width)))
        assert lay.padding_fraction == pytest.approx(1 - height * width / (cp * th * tw))


def test_least_padding_at_longcat_shapes():
    # 480p: 30 x 52 patches. BSA blocks of 4 rows: 8 rows per rank at cp=4 (32 rows, 2 of them padding).
    lay = choose_layout(30, 52, 4, (4, 4))
    assert (lay.split, lay.tile) == ((4, 1), (8, 52)) and lay.padding_fraction == pytest.approx(1 - 30 / 32)
    # 720p: 45 x 80 at cp=8: 8 x 1 would pad 45 rows to 64; 4 x 2 tiles of 12 x 40 pad to 48 only.
    lay = choose_layout(45, 80, 8, (4, 4))
    assert (lay.split, lay.tile) == ((4, 2), (12, 40)) and lay.padding_fraction == pytest.approx(1 - 45 / 48)
    # dense attention needs no whole blocks: 30 x 52 over 4 ranks splits without padding
    lay = choose_layout(30, 52, 4)
    assert lay.padding_fraction == 0 and lay.split == (2, 2) and lay.tile == (15, 26)
    # the plain H split is kept when it divides (ties go to more rows)
    assert choose_layout(32, 32, 4, (4, 4)).split == (4, 1)


def test_least_padding_is_the_minimum_over_all_splits():
    for h, w, cp in [(17, 23, 6), (9, 40, 8), (45, 80, 16)]:
        best = min(math.prod(choose_layout(h, w, cp, (4, 4), split=(d, cp // d)).padded)
                   for d in range(1, cp + 1) if cp % d == 0)
        assert math.prod(choose_layout(h, w, cp, (4, 4)).padded) == best


def test_bad_splits_name_the_key():
    with pytest.raises(ConfigError, match=r"cp_split_hw=\[3, 2\].*parallel.cp=4"):
        choose_layout(8, 8, 4, split=(3, 2))
    with pytest.raises(ConfigError, match=r"parallel.cp_split_hw: must be \[ch, cw\] with ch \* cw = cp = 4"):
        ParallelConfig(cp=4, cp_split_hw=(2, 1)).validate()
    ParallelConfig(cp=4, cp_split_hw=(2, 2)).validate()


def test_whole_blocks_only_where_block_sparse_attention_runs_on_the_tiles():
    assert tile_unit("bsa", "ring", (4, 2, 8)) == (2, 8)  # the block's H and W
    assert tile_unit("bsa", "ulysses", (4, 2, 8)) == (1, 1)  # Ulysses attends on the gathered full grid
    assert tile_unit("dense", "ring", (4, 2, 8)) == (1, 1)
