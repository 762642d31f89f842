"""``trainer.init_from`` with one of our runs: a stage starts from exactly the weights another run saved.

The reference is the saving trainer's own memory (its model and EMA after the last step), not anything
read back from the checkpoint; the starting weights are compared bit for bit, built by one process and by
two FSDP2 ranks (meta init, rank 0 reads, shards broadcast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import conf
from tests.training._runs import tiny_overrides

try:
    from tests.parallel._dist import close_pools, get_pool
except ImportError:  # pragma: no cover
    from _dist import close_pools, get_pool

CONF = str(Path(conf.__file__).parent)


def _config(*overrides):
    from lcv_train.config import train_config_from_dict

    with initialize_config_dir(config_dir=CONF, version_base=None):
        container = OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)
    return train_config_from_dict(container), container


def _trained(tmp: Path):
    from lcv_train.training.trainer import Trainer
    from parallel.parallelize import canonical_name

    o = tiny_overrides(tmp, tmp / "data") + ["run.name=src", "trainer.max_steps=2", "trainer.checkpoint_every=2",
                                             "trainer.sample_at_end=false", "ema.decay=0.5"]
    cfg, container = _config(*o)
    trainer = Trainer(cfg, container)
    trainer.fit()
    model = {canonical_name(k): v.detach().clone() for k, v in trainer.model.state_dict().items()}
    ema = dict(model)
    ema.update({k: v.clone() for k, v in trainer.ema.state_dict().items()})
    return o, cfg, {"model": model, "ema": ema}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init_from_ours")
    overrides, cfg, ref = _trained(tmp)
    torch.save(ref, tmp / "ref.pt")
    yield tmp, overrides, cfg, ref
    close_pools()


def _start_sharded(rank, world, run_dir, ref_file, model_json):
    from lcv_train.model import DiTConfig
    from lcv_train.model.build import build_dit
    from parallel import ParallelConfig, init_distributed
    from parallel.parallelize import canonical_name

    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # what torchrun sets
    pcfg = ParallelConfig(name="fsdp", engine="fsdp", mixed_precision="fp32")
    dims = init_distributed(pcfg)  # the pool's process group is up already
    assert dims.uses_fsdp and dims.world_size == world
    ref = torch.load(ref_file)
    for which in ("ema", "model"):
        model = build_dit(DiTConfig.from_json_dict(json.loads(model_json)), dims, pcfg, "cpu", seed=7,
                          init_from=str(run_dir), init_weights=which)
        state = model.state_dict()
        assert set(map(canonical_name, state)) == set(ref[which])
        for k, v in state.items():
            assert v.to_local().numel() < v.numel() or v.numel() < world  # really sharded
            torch.testing.assert_close(v.full_tensor(), ref[which][canonical_name(k)], rtol=0, atol=0, msg=k)


def test_a_stage_starts_from_exactly_the_weights_a_run_saved(run):
    """Bug caught: the wrong set (model for EMA), a lossy dtype on the way, or a shard filled from another
    tensor: the start must equal the saving trainer's EMA (default) or model, bit for bit."""
    from lcv_train.training.trainer import Trainer

    tmp, overrides, cfg, ref = run
    assert any(not torch.equal(ref["ema"][k], ref["model"][k]) for k in ref["model"])  # the choice matters
    # The trainer, one process: a new stage named by the run directory (its latest checkpoint).
    for which in ("ema", "model"):
        cfg2, container = _config(*overrides, f"run.name=next_{which}", f"trainer.init_from={tmp / 'src'}",
                                  f"trainer.init_weights={which}", "stage=sft")
        trainer = Trainer(cfg2, container)
        try:
            for k, v in trainer.model.state_dict().items():
                torch.testing.assert_close(v, ref[which][k], rtol=0, atol=0, msg=k)
            assert trainer.progress.step == 0  # weights only: a new run
        finally:
            trainer.loader.close()
            trainer.watchdog.close()
    # Two FSDP2 ranks, from the step_N directory itself.
    step = tmp / "src" / "checkpoints" / "step_0000002"
    get_pool(2).run(_start_sharded, step, tmp / "ref.pt", json.dumps(cfg.model.to_json_dict()))


def test_bad_sources_stop_with_one_line_naming_them(run, tmp_path):
    import torch.distributed.checkpoint as dcp

    from lcv_train.checkpoints import init_source
    from lcv_train.errors import CheckpointError
    from lcv_train.model import LongCatDiT

    tmp, _, cfg, ref = run
    with torch.device("meta"):
        model = LongCatDiT(cfg.model)
    cases = [(tmp_path / "nowhere", FileNotFoundError, "point trainer.init_from at one of those")]
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    cases.append((tmp_path / "empty_run", FileNotFoundError, "has the run saved one yet"))
    # A checkpoint without EMA (ema.decay=0): the default init_weights=ema names the fix.
    no_ema = tmp_path / "no_ema"
    dcp.save({"engine": {"model": ref["model"]}}, checkpoint_id=str(no_ema), no_dist=True)
    (no_ema / "meta.json").write_text(json.dumps({"model": cfg.model.to_json_dict(), "step": 1}))
    cases.append((no_ema, CheckpointError, "trainer.init_weights=model"))
    for path, error, fix in cases:
        with pytest.raises(error) as e:
            init_source(model, path)
        assert str(path) in str(e.value) and fix in str(e.value) and "\n" not in str(e.value), e.value
    init_source(model, no_ema, "model")  # the model weights are there
    # Another model's run: names the key and the preset that fits.
    with torch.device("meta"):
        small = LongCatDiT.from_preset("small")
    with pytest.raises(CheckpointError, match="hidden_size=64 but model.hidden_size=256; use model=tiny"):
        init_source(small, tmp / "src")
