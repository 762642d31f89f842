"""Shared test settings: few threads (CI has 2 cores) and no progress bars."""

import os

os.environ.setdefault("LCV_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
