"""``stage=grpo`` on the tiny model, in process: on-policy first update, LoRA-only changes, the KL to the
reference, a closed-form reward that rises, exact resume, config errors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lcv_train.errors import ConfigError
from lcv_train.rewards import VideoScorer, register_scorer
from tests.training.test_distributed_train import write_published_tiny


@register_scorer("brightness_test")
class Brightness(VideoScorer):
    """Mean pixel value in [-1, 1]: a reward with a closed-form optimum (a white video)."""

    name = "brightness_test"

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        return videos.float().flatten(1).mean(1).cpu()


@register_scorer("prompt_recorder_test")
class PromptRecorder(VideoScorer):
    """Scores 0 and remembers the prompts it was given."""

    name = "prompt_recorder_test"
    seen: list[list[str]] = []

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> torch.Tensor:
        PromptRecorder.seen.append(list(prompts))
        return torch.zeros(videos.shape[0])


def _config(tmp_path, *extra):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import conf
    from lcv_train.config import train_config_from_dict

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves right\na blue square moves up\n\na green ball falls\n")
    if not (tmp_path / "pub").exists():
        write_published_tiny(tmp_path / "pub", seed=3)
    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=r", "logger=none", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}",
                 "synthetic.n=4", "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16",
                 "data.buckets=[[5,16,16]]", "data.batch_size=2", "data.num_workers=0", "trainer.sample_at_end=false",
                 "trainer.device=cpu", "stage=grpo", f"stage.prompts={prompts}", "stage.frames=2",
                 "stage.height=16", "stage.width=16", "stage.steps=3", "stage.sde_window=[1,3]",
                 "stage.group_size=4", "stage.prompts_per_step=2", "stage.guidance=2.0", "lora.rank=4",
                 "lora.alpha=4.0", f"trainer.init_from={tmp_path / 'pub'}", "trainer.checkpoint_every=100", *extra]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=overrides)
    return train_config_from_dict(OmegaConf.to_container(cfg, resolve=True))


def _rows(tmp_path, name="r"):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_first_update_is_on_policy_only_lora_changes_and_kl_starts_at_zero(tmp_path):
    """Two updates on one rollout. Catches: an old log-prob that is not the rollout policy's (ratio != 1 on the
    first update), a second update that does not reuse the rollout (ratio stays 1), base weights that train
    under LoRA, a reference that is not the base (KL != 0 while the LoRA up projections are still zero)."""
    from lcv_train.lora import is_lora_name
    from lcv_train.training.trainer import Trainer

    cfg = _config(tmp_path, "trainer.max_steps=2", "stage.updates_per_rollout=2", "stage.kl_beta=0.1",
                  "stage.clip_range=0.5", "optim.lr=3e-2", "ema.decay=0")
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer._core_model().state_dict().items()}
    trainer.fit()
    after = trainer._core_model().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_lora_name(k) for k in changed), sorted(changed)[:5]
    first, second = _rows(tmp_path)
    assert first["grpo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert first["grpo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["grpo/rollout_log_prob_drift"] < 1e-5
    assert first["grpo/kl"] == pytest.approx(0.0, abs=1e-10)  # LoRA up starts at zero: policy = reference
    assert second["grpo/update_in_rollout"] == 2 and "grpo/reward/brightness_test_mean" not in second
    assert abs(second["grpo/ratio_max"] - 1) > 1e-4 or abs(second["grpo/ratio_min"] - 1) > 1e-4
    assert second["grpo/kl"] > 0
    # every logged figure the README promises, on the rollout's step
    for key in ("grpo/reward/motion_mean", "grpo/reward/motion_std", "grpo/reward_running/motion_mean",
                "grpo/reward_running/motion_std", "grpo/advantage_mean", "grpo/advantage_std", "grpo/clip_fraction",
                "grpo/ratio_mean", "grpo/kl", "train/loss"):
        assert key in first and math.isfinite(first[key]), key
    assert sum(first[f"grpo/critical_step/{i}"] for i in (1, 2)) == 2  # one critical step per prompt


def test_full_fine_tune_keeps_the_initial_weights_as_reference(tmp_path):
    """``lora.rank=0``: every parameter may train, and the KL is to the weights of the first step. Catches a
    reference that follows the policy (KL stays 0) or a policy left holding the reference's weights after the
    KL pass (the second update's ratio back at 1)."""
    from lcv_train.training.trainer import Trainer

    cfg = _config(tmp_path, "trainer.max_steps=2", "stage.updates_per_rollout=2", "stage.kl_beta=0.1",
                  "stage.clip_range=0.5", "optim.lr=1e-3", "ema.decay=0", "lora.rank=0")
    trainer = Trainer(cfg)
    trainer.fit()
    first, second = _rows(tmp_path)
    assert first["grpo/kl"] == pytest.approx(0.0, abs=1e-12) and second["grpo/kl"] > 0
    assert abs(second["grpo/ratio_max"] - 1) > 1e-4 or abs(second["grpo/ratio_min"] - 1) > 1e-4
    ref = trainer.stage.reference
    now = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(ref) == len(now) and any(not torch.equal(a, b.detach()) for a, b in zip(ref, now))


def test_grpo_raises_a_closed_form_reward_with_bounded_kl(tmp_path):
    """GRPO with a reward whose optimum is known (brightness) moves it up within a few dozen updates while the
    KL to the base stays small. Catches a sign error anywhere between advantages and the optimizer step."""
    from lcv_train.training.trainer import Trainer

    steps = 24
    cfg = _config(tmp_path, f"trainer.max_steps={steps}", "stage.rewards=[brightness_test]",
                  "stage.reward_weights=[1.0]", "stage.clip_range=0.2", "stage.kl_beta=0.004", "optim.lr=2e-2",
                  "ema.decay=0", "stage.guidance=1.0")
    Trainer(cfg).fit()
    rows = _rows(tmp_path)
    reward = [r["grpo/reward/brightness_test_mean"] for r in rows]
    first, last = sum(reward[:6]) / 6, sum(reward[-6:]) / 6
    assert last > first + 0.05, reward
    assert max(r["grpo/kl"] for r in rows) < 10.0


def test_resume_continues_exactly(tmp_path):
    """Steps 1-4 in one run equal steps 1-2, a checkpoint, then 3-4 in a new process state (prompts, noise,
    critical steps, running reward statistics, LoRA and optimizer)."""
    from lcv_train.training.trainer import Trainer

    common = ["stage.kl_beta=0.1", "stage.clip_range=0.2", "optim.lr=1e-2", "stage.updates_per_rollout=2"]
    Trainer(_config(tmp_path, "trainer.max_steps=4", "run.name=one", *common)).fit()
    Trainer(_config(tmp_path, "trainer.max_steps=2", "run.name=split", "trainer.checkpoint_every=2", *common)).fit()
    resumed = Trainer(_config(tmp_path, "trainer.max_steps=4", "run.name=split", "trainer.checkpoint_every=2",
                              *common))
    assert resumed.progress.step == 2 and resumed.stage.running[0, 0] == 8  # 2 prompts x G=4 scored
    resumed.fit()
    one, split = _rows(tmp_path, "one"), _rows(tmp_path, "split")
    keys = [k for k in one[-1] if k.startswith(("grpo/", "train/loss"))]
    for a, b in zip(one[2:], split[2:]):
        assert a["step"] == b["step"]
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)


def test_prompts_from_the_data_shards_reach_the_rewards_group_by_group(tmp_path):
    """``stage.prompts=null``: the captions of the next data batch are the prompts, each repeated G times in
    the rows the scorer sees (prompt-major). A reward that is the same for the whole group gives zero advantages."""
    from lcv_train.training.trainer import Trainer

    PromptRecorder.seen.clear()
    cfg = _config(tmp_path, "trainer.max_steps=1", "stage.prompts=null", "stage.rewards=[prompt_recorder_test]",
                  "stage.group_size=3")
    Trainer(cfg).fit()
    (seen,) = PromptRecorder.seen
    assert len(seen) == 6 and all(p for p in seen)
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5]
    (row,) = _rows(tmp_path)
    assert row["grpo/advantage_abs_max"] == 0.0


def test_update_in_chunks_equals_the_whole_batch(tmp_path):
    """``stage.update_batch=3`` (8 rows: chunks of 3, 3, 2) takes the same updates as one pass over the batch.
    Catches chunk losses not weighted by their size (the last, smaller chunk over-counted)."""
    from lcv_train.training.trainer import Trainer

    common = ["trainer.max_steps=2", "stage.kl_beta=0.1", "stage.clip_range=0.2", "optim.lr=1e-2",
              "stage.updates_per_rollout=2", "optim.grad_clip=0"]
    Trainer(_config(tmp_path, "run.name=whole", *common)).fit()
    Trainer(_config(tmp_path, "run.name=chunks", "stage.update_batch=3", *common)).fit()
    for a, b in zip(_rows(tmp_path, "whole"), _rows(tmp_path, "chunks")):
        for k in ("train/loss", "train/grad_norm", "grpo/kl", "grpo/ratio_min", "grpo/ratio_max"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-8), (a["step"], k)
    assert _rows(tmp_path, "whole")[1]["grpo/kl"] > 0


def test_grpo_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^stage\.sde_window: must satisfy 1 <= start"):
        _config(tmp_path, "stage.sde_window=[0,2]")
    with pytest.raises(ConfigError, match=r"^stage\.reward_weights: must have one weight per reward"):
        _config(tmp_path, "stage.rewards=[motion,brightness_test]")
    with pytest.raises(ConfigError, match=r"^stage\.prompts: no such file"):
        _config(tmp_path, f"stage.prompts={tmp_path / 'missing.txt'}")


def _cli_overrides(tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves right\na blue square moves up\na green ball falls\n")
    write_published_tiny(tmp_path / "pub", seed=3)
    return [f"run.root={tmp_path / 'runs'}", "logger=none", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}", "synthetic.n=4",
            "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16", "data.buckets=[[5,16,16]]",
            "data.batch_size=2", "data.num_workers=0", "trainer.sample_at_end=false", "trainer.device=cpu",
            "stage=grpo", f"stage.prompts={prompts}", "stage.frames=2", "stage.height=16", "stage.width=16",
            "stage.steps=3", "stage.sde_window=[1,3]", "stage.group_size=4", "stage.prompts_per_step=2",
            "stage.guidance=2.0", "lora.rank=4", "lora.alpha=4.0", f"trainer.init_from={tmp_path / 'pub'}",
            "stage.kl_beta=0.1", "stage.clip_range=0.2", "optim.lr=1e-2", "stage.updates_per_rollout=2",
            "trainer.max_steps=3", "parallel.mixed_precision=fp32"]


@pytest.mark.slow
def test_fsdp_two_ranks_with_cp2_match_one_process_and_dp2_gathers_the_groups(tmp_path):
    """FSDP2 over 2 gloo ranks with cp=2 (one replica: the same rollouts) takes the same updates as one process
    (rewards, KL, ratios and loss per step); with dp=2 each rank rolls out its own prompts and the rewards and
    critical steps of both are gathered (16 videos and 4 critical steps per rollout, 2 ranks x 2 prompts x G=4).
    Catches: a cp rank drawing its own noise or prompts, groups split across ranks, advantages normalised
    per rank while the figures claim the job's."""
    from tests.training._runs import train_here
    from tests.training.test_distributed_train import torchrun

    o = _cli_overrides(tmp_path)
    train_here(o + ["run.name=one"])
    torchrun(o + ["run.name=cp", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo"], cwd=tmp_path)
    torchrun(o + ["run.name=dp", "parallel=fsdp", "parallel.backend=gloo"], cwd=tmp_path)
    one, cp, dp = _rows(tmp_path, "one"), _rows(tmp_path, "cp"), _rows(tmp_path, "dp")
    assert len(one) == len(cp) == 3
    for a, b in zip(one, cp):
        for k in ("grpo/kl", "grpo/ratio_min", "grpo/ratio_max", "grpo/reward/motion_mean", "grpo/reward/motion_std"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (a["step"], k)
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
    assert one[1]["grpo/kl"] > 0 and one[1]["grpo/ratio_max"] != 1.0  # the update did something
    assert [r.get("grpo/videos_scored") for r in dp] == [16, None, 32]
    assert [sum(r[f"grpo/critical_step/{i}"] for i in (1, 2)) for r in (dp[0], dp[2])] == [4, 4]
    assert dp[0]["grpo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
