"""``python -m lcv_train`` == ``lcv-train`` (what torchrun launches)."""

from lcv_train.cli import train_main

train_main()
