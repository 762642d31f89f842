"""Reading and writing the published LongCat-Video checkpoint format."""

from lcv_train.checkpoints.published import (check_published_dit, dit_dir, export_published_dit, load_published_dit,
                                             load_published_state_dict, read_dit_config)
from lcv_train.checkpoints.source import WEIGHTS, WeightSource, init_source

__all__ = ["WEIGHTS", "WeightSource", "check_published_dit", "dit_dir", "export_published_dit", "init_source",
           "load_published_dit", "load_published_state_dict", "read_dit_config"]
