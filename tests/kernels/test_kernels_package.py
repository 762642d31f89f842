"""Our top-level ``kernels`` package must not fool libraries that probe for Hugging Face's ``kernels``.

Each check runs in a fresh interpreter with the repository root on sys.path (so ``kernels`` is importable
the way it is in training), because the probes cache their answer and triton imports are process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_import_kernels_does_not_import_triton():
    out = _run(
        "import sys, importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "import kernels, kernels.bsa\n"
        "from kernels.bsa import block_sparse_attention, block_attention, blockify, unblockify, "
        "pool_blocks, select_blocks\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n")
    assert out == "[]"


def test_transformers_does_not_see_hf_kernels():
    out = _run(
        "import importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print(is_kernels_available())\n")
    assert out == "False"


def test_diffusers_does_not_see_hf_kernels():
    out = _run(
        "import importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "from diffusers.utils import is_kernels_available\n"
        "print(is_kernels_available())\n")
    assert out == "False"
