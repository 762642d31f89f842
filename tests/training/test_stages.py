"""Stages own their step: the registry, the step context, stage metrics and state, the data-parallel loss.

A stage registered here (not one of ours) is picked by ``stage.kind``, its own config keys are validated
by its config class, its metrics reach ``metrics.jsonl`` and its state survives a resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lcv_train.errors import ConfigError
from lcv_train.stages import FlowMatchingStage, StageConfig, register_stage


@dataclass
class CountingConfig(StageConfig):
    bonus: float = 0.0  # a key only this stage has


@register_stage("counting_test", CountingConfig)
class CountingStage(FlowMatchingStage):
    """The flow-matching step plus a counter it saves and a metric of its own."""

    def __init__(self, cfg, train_cfg):
        super().__init__(cfg, train_cfg)
        self.calls = 0

    def step(self, ctx):
        m = super().step(ctx)
        self.calls += 1
        m["stage/calls"] = self.calls + self.cfg.bonus
        return m

    def state_dict(self):
        return {"calls": torch.tensor(self.calls)}

    def load_state_dict(self, sd):
        self.calls = int(sd["calls"])


@register_stage("no_update_test", StageConfig)
class NoUpdateStage(FlowMatchingStage):
    def step(self, ctx):
        ctx.next_batch()
        return {}


def _config(tmp_path, *extra):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import conf
    from lcv_train.config import train_config_from_dict

    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=r", "logger=none", "model=tiny", f"synthetic.dir={tmp_path / 'data'}",
                 "synthetic.n=4", "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16",
                 "data.buckets=[[5,16,16]]", "data.batch_size=2", "data.num_workers=0", "trainer.sample_at_end=false",
                 "trainer.device=cpu", "trainer.checkpoint_every=2", "eval.at_end=false", *extra]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=overrides)
    return train_config_from_dict(OmegaConf.to_container(cfg, resolve=True))


def test_a_registered_stage_runs_logs_its_metrics_and_resumes_its_state(tmp_path):
    from lcv_train.training.trainer import Trainer

    cfg = _config(tmp_path, "stage.kind=counting_test", "+stage.bonus=0.5", "trainer.max_steps=2")
    assert isinstance(cfg.stage, CountingConfig) and cfg.stage.bonus == 0.5
    Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage/calls"] for r in rows] == [1.5, 2.5]
    assert all(math.isfinite(r["train/loss"]) and "train/sigma_mean" in r for r in rows)
    resumed = Trainer(_config(tmp_path, "stage.kind=counting_test", "trainer.max_steps=3"))
    assert resumed.progress.step == 2 and resumed.stage.calls == 2  # the stage's own state came back
    resumed.fit()
    last = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["stage/calls"] == 3


def test_stage_keys_are_validated_by_the_stage_config(tmp_path):
    with pytest.raises(ConfigError, match=r"^stage\.bonus: unknown key"):
        _config(tmp_path, "+stage.bonus=1.0")  # flow_matching has no such key
    with pytest.raises(ConfigError, match=r"^stage\.kind: must be one of .*flow_matching.*, got 'nope'"):
        _config(tmp_path, "stage.kind=nope")


def test_a_step_that_never_steps_the_optimizer_is_refused(tmp_path):
    from lcv_train.training.trainer import Trainer

    trainer = Trainer(_config(tmp_path, "stage.kind=no_update_test", "trainer.max_steps=1", "trainer.resume=none"))
    with pytest.raises(RuntimeError, match="must call ctx.optimizer_step exactly once"):
        trainer.train_step(iter(trainer.loader))


def _reduce(rank, world):
    from lcv_train.training.trainer import dp_mean_and_any

    a = dp_mean_and_any(torch.tensor(1.0 + 2 * rank), flag=(rank == 1))
    b = dp_mean_and_any(torch.tensor(float("nan") if rank == 0 else 1.0), flag=False)
    return a, b


def test_the_logged_loss_is_the_mean_over_ranks_and_a_stop_on_one_rank_stops_all():
    """Two gloo ranks with losses 1 and 3: both log 2 (catches: rank 0's loss logged as the job's); a stop
    request on rank 1 alone is seen by both; a NaN on rank 0 alone makes both see NaN (both skip)."""
    from tests.parallel._spawn import run_ranks

    for (mean, stop), (nan_mean, no_stop) in run_ranks(_reduce, 2):
        assert mean == 2.0 and stop is True
        assert math.isnan(nan_mean) and no_stop is False
