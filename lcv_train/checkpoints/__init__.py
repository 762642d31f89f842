"""Reading and writing the published LongCat-Video checkpoint format."""

from lcv_train.checkpoints.published import (dit_dir, export_published_dit, load_published_dit,
                                             load_published_state_dict, read_dit_config)

__all__ = ["dit_dir", "export_published_dit", "load_published_dit", "load_published_state_dict", "read_dit_config"]
