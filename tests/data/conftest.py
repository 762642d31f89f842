import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from data_loaders import ensure_synthetic_shards  # noqa: E402


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory) -> str:
    """48 synthetic clips (9-12 frames, 32x32) + 16 still images, 16 samples per shard (4 shards)."""
    d = tmp_path_factory.mktemp("syn") / "shards"
    return ensure_synthetic_shards(str(d), n=64, frames=(9, 12), height=32, width=32, fps=8.0, seed=1,
                                   image_fraction=0.25, samples_per_shard=16)
