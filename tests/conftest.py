"""Shared test settings: no progress bars, W&B never online."""

import os

os.environ.setdefault("LCV_NO_PROGRESS", "1")
os.environ.pop("WANDB_API_KEY", None)  # W&B runs offline in tests (logger.mode=auto)
