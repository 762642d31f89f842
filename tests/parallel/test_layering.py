"""Layering: kernels import nothing of ours above them; parallel never imports the model (it learns what
it needs from ``model.parallel_plan()``); the model package never imports parallel's mechanics."""

import subprocess
import sys

from tests.training._runs import env

PARALLEL = ["parallel", "parallel.dims", "parallel.fsdp", "parallel.engine", "parallel.parallelize", "parallel.plan",
            "parallel.tensor_parallel", "parallel.context_parallel", "parallel.context_parallel.ops",
            "parallel.context_parallel.ring", "parallel.zero"]


def _loaded_after(modules: list[str]) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('\\n'.join(sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return set(p.stdout.split())


def test_layers_import_only_downwards():
    kernels = _loaded_after(["kernels", "kernels.attention", "kernels.attention_op", "kernels.bsa"])
    assert not {m for m in kernels if m.startswith(("lcv_train", "parallel", "data_loaders"))}
    par = _loaded_after(PARALLEL)
    assert not {m for m in par if m.startswith(("lcv_train.model", "lcv_train.training", "lcv_train.stages"))}
    model = _loaded_after(["lcv_train.model", "lcv_train.model.dit"])
    assert not {m for m in model if m.startswith("parallel.") and m not in ("parallel.plan",)} - {"parallel"}
