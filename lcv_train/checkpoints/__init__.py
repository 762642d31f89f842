"""Reading and writing the published LongCat-Video checkpoint format."""

from lcv_train.checkpoints.published import (check_published_dit, dit_dir, export_published_dit, load_published_dit,
                                             load_published_state_dict, read_dit_config)

__all__ = ["check_published_dit", "dit_dir", "export_published_dit", "load_published_dit",
           "load_published_state_dict", "read_dit_config"]
