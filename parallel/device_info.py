"""Peak dense bf16 throughput of a device, for model-FLOPs utilisation (MFU).

Numbers are the vendors' dense (no 2:4 sparsity) bf16 tensor-core peaks of the SXM/OAM parts; PCIe and
NVL variants are matched by name where they differ. Unknown GPUs fall back to the H100 SXM figure with
a one-time warning; CPUs get a nominal 1 TFLOP/s so that MFU stays a finite, comparable number.
Override with ``LCV_PEAK_FLOPS`` (FLOP/s) when the table is wrong for your part.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# (substring of the lower-cased device name, dense bf16 FLOP/s); first match wins, so specific names first.
PEAK_BF16: list[tuple[str, float]] = [
    ("gb200", 2.5e15),
    ("b200", 2.25e15),
    ("b100", 1.75e15),
    ("gh200", 989e12),
    ("h200 nvl", 836e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h800 pcie", 756e12),
    ("h800", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
    ("v100", 125e12),  # fp16 tensor cores (no bf16)
    ("mi300x", 1307e12),
    ("mi250", 362e12),
]
CPU_NOMINAL = 1e12
DEFAULT_GPU = 989e12
_warned: set[str] = set()


def peak_flops_by_name(name: str) -> float | None:
    n = name.lower()
    for key, value in PEAK_BF16:
        if key in n:
            return value
    return None


def peak_flops(device: torch.device | str | None = None) -> float:
    """Dense bf16 peak FLOP/s of ``device`` (one GPU, or the nominal CPU figure)."""
    env = os.environ.get("LCV_PEAK_FLOPS")
    if env:
        return float(env)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU_NOMINAL
    name = torch.cuda.get_device_name(device)
    value = peak_flops_by_name(name)
    if value is None:
        if name not in _warned:
            _warned.add(name)
            log.warning("peak_flops: unknown GPU %r, assuming %.0f TFLOP/s (set LCV_PEAK_FLOPS)", name, DEFAULT_GPU / 1e12)
        return DEFAULT_GPU
    return value
