"""Weights in and out: the published LongCat-Video format (``published.py``), our own training checkpoints
read back whole (``ours.py``), and the source of a model's starting weights, either of them (``source.py``)."""

from lcv_train.checkpoints.ours import read_our_weights
from lcv_train.checkpoints.published import (check_published_dit, dit_dir, export_published_dit, load_published_dit,
                                             load_published_state_dict, read_dit_config)
from lcv_train.checkpoints.source import WEIGHTS, WeightSource, init_source

__all__ = ["WEIGHTS", "WeightSource", "check_published_dit", "dit_dir", "export_published_dit", "init_source",
           "load_published_dit", "load_published_state_dict", "read_dit_config", "read_our_weights"]
