"""Optional packages some tests need: DeepSpeed (the ZeRO engines), megatron-core (tensor parallelism), the
curation extra (PySceneDetect, OpenCV, pandas, Ray) and Triton (a Linux-only dependency).

`pip install -e ".[dev]"` installs both. When one is missing, only the tests that need it are skipped, with
the reason in the summary; the others still run. Under CI (``CI`` set) a missing package fails those tests
instead: CI walks the README's install, so a missing package there is a broken install, not a choice.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

INSTALL_HINT = 'pip install -e ".[dev]" installs it'
PACKAGES = {"deepspeed": "DeepSpeed", "megatron": "megatron-core", "scenedetect": "PySceneDetect",
            "cv2": "OpenCV", "pandas": "pandas", "ray": "Ray", "triton": "Triton"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_reason(module: str) -> str | None:
    """Why a test needing ``module`` cannot run here, or None when it is importable."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{PACKAGES.get(module, module)} is not installed ({INSTALL_HINT})"


def require(module: str) -> None:
    """Skip the calling test (fail it under CI) when ``module`` is missing."""
    reason = missing_reason(module)
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    # Justified: outside CI only (a laptop without an optional extra); under CI it failed just above.
    pytest.skip(reason)


def needs(module: str):
    """Decorator form of ``require``: ``@needs("deepspeed")``."""
    reason = missing_reason(module)
    # Justified: skips only outside CI (a laptop without an optional extra); under CI the mark is off, so the
    # test runs and fails on the missing import, exactly as ``require`` fails it.
    return pytest.mark.skipif(reason is not None and not in_ci(), reason=reason or "")
