"""lcv-train: training for LongCat-Video-class video diffusion transformers."""

__version__ = "0.1.0"

import warnings as _warnings

# DCP saves and loads in one process (single-process training, lcv-export) on purpose; torch warns on every
# such call that it "assumes the intent is to save in a single process". It is the intent: keep it quiet.
_warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
