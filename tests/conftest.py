"""Shared test settings: no progress bars, W&B never online."""

import os

import torch

os.environ.setdefault("LCV_NO_PROGRESS", "1")
# Triton reads TRITON_INTERPRET when it is first imported: set it before any test imports triton, so the
# Triton kernels run under the CPU interpreter in this process (on a GPU machine they compile for real).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("WANDB_API_KEY", None)  # W&B runs offline in tests (logger.mode=auto)
