"""Fast checks of the multi-node pieces, in one process: the config fingerprint, the phase watchdog, the
per-node hsdp default, the per-rank Hydra overrides and the SLURM store port."""

from __future__ import annotations

import re
import time

import pytest

from lcv_train.errors import ConfigError
from lcv_train.multinode import hydra_rank_overrides
from lcv_train.training.fingerprint import PER_RANK_KEYS, compared, differences, fingerprint
from lcv_train.training.watchdog import PhaseWatchdog
from parallel import ParallelConfig
from parallel.dims import ParallelDims

from ._support import TRAIN_SBATCH

CONFIG = {"run": {"name": "a", "root": "outputs", "seed": 0}, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
          "trainer": {"device": "auto", "checkpoint_every": 100}, "synthetic": {"dir": "~/.cache/x"},
          "vae": {"kind": "wan2.1", "path": "/ckpt/a"}}


def _with(config: dict, key: str, value) -> dict:
    import copy

    out = copy.deepcopy(config)
    node = out
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def test_fingerprint_names_every_differing_key_and_ignores_per_rank_keys():
    other = _with(_with(CONFIG, "optim.lr", 5e-4), "trainer.checkpoint_every", 7)
    assert differences(compared(other), compared(CONFIG)) == ["optim.lr", "trainer.checkpoint_every"]
    assert fingerprint(other) != fingerprint(CONFIG)
    # A list element and a key present on one side only count too.
    assert differences(compared(_with(CONFIG, "optim.betas", [0.9, 0.99])), compared(CONFIG)) == ["optim.betas"]
    assert differences(compared(_with(CONFIG, "optim.extra", 1)), compared(CONFIG)) == ["optim.extra"]
    # Where things live on a node, and the run name (rank 0's is used), may differ.
    local = _with(_with(_with(_with(CONFIG, "trainer.device", "cpu"), "synthetic.dir", "/local/x"), "vae.path", "/b"),
                  "run.name", "b")
    assert fingerprint(local) == fingerprint(CONFIG)
    assert {"trainer.device", "synthetic.dir", "vae.path", "run.name"} <= set(PER_RANK_KEYS)
    assert "run.seed" in compared(CONFIG) and "run.root" in compared(CONFIG)


def test_watchdog_names_step_and_phase_and_cleans_up():
    """The line a stuck collective produces: step, phase, limit and the key that sets it; the cleanup (rank 0
    removes a half-written checkpoint) runs first. Faster phases never fire."""
    cleaned = []
    w = PhaseWatchdog(collective_timeout_s=0.5, save_timeout_s=1.5, on_timeout=lambda: cleaned.append(1), poll_s=0.05,
                      exit_process=False, enabled=True)
    try:
        w.enter("startup", 0)  # as the trainer does while it builds the model
        w.enter("forward", 1)  # the first step of the attempt gets the long limit (warm-up)
        time.sleep(0.8)
        assert w.fired is None
        for _ in range(5):  # quick phases of later steps
            w.enter("forward", 2), time.sleep(0.05), w.enter("backward", 2), time.sleep(0.05)
        w.enter("save", 2)
        time.sleep(0.8)
        assert w.fired is None  # saves get save_timeout_s
        w.enter("backward", 3)
        deadline = time.monotonic() + 5
        while w.fired is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.close()
    assert w.fired is not None and w.fired.startswith("step 3: phase backward still running after 0.5 s")
    assert "trainer.collective_timeout_s=0.5" in w.fired
    assert cleaned == [1]


def test_hsdp_replicates_once_per_node_by_default(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    d = ParallelDims.from_config(ParallelConfig(name="hsdp", dp_replicate=-1), world_size=32)
    assert (d.dp_replicate, d.dp_shard) == (4, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="dp_replicate"):
        ParallelDims.from_config(ParallelConfig(name="hsdp", dp_replicate=-1), world_size=32)


def test_only_rank0_keeps_hydra_shared_files(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert hydra_rank_overrides(["x=1"]) == []
    monkeypatch.setenv("RANK", "3")
    o = hydra_rank_overrides(["x=1"])
    assert "hydra.output_subdir=null" in o and "~hydra.job_logging.handlers.file" in o
    assert hydra_rank_overrides(["--cfg", "job"]) == []


def test_slurm_store_port_stays_below_the_ephemeral_range():
    """Catches the old default 20000 + job id % 20000, which reaches 39999: inside Linux's ephemeral range
    (32768-60999), where an outgoing connection may already hold the port."""
    text = TRAIN_SBATCH.read_text()
    m = re.search(r"LCV_RDZV_PORT:-\$\(\((\d+) \+ SLURM_JOB_ID % (\d+)\)\)", text)
    assert m, "default port expression not found"
    base, mod = int(m[1]), int(m[2])
    assert 1024 <= base and base + mod - 1 < 32768
