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
    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=r", "logger=none", "model=tiny", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}",
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


def test_first_update_is_on_policy_only_lora_changes_and_kl_starts_at_zero(tmp_path, monkeypatch):
    """Two updates on one rollout. Catches: an old log-prob that is not the rollout policy's (ratio != 1 on the
    first update), a second update that does not reuse the rollout (ratio stays 1), a backpropagated loss
    whose old log-prob is not the rollout's (the logged figures, computed apart, would still look right), base
    weights that train under LoRA, a reference that is not the base (KL != 0 while the LoRA up projections are
    still zero)."""
    import lcv_train.stages.grpo as grpo_stage
    from lcv_train.lora import is_lora_name
    from lcv_train.training.trainer import Trainer

    backpropagated = []  # (log_prob, old_log_prob) of every loss that carries a gradient
    real_loss = grpo_stage.grpo_loss

    def recording_loss(log_prob, old_log_prob, *args, **kwargs):
        if log_prob.requires_grad:
            backpropagated.append((log_prob.detach().clone(), old_log_prob.detach().clone()))
        return real_loss(log_prob, old_log_prob, *args, **kwargs)

    monkeypatch.setattr(grpo_stage, "grpo_loss", recording_loss)
    cfg = _config(tmp_path, "trainer.max_steps=2", "stage.updates_per_rollout=2", "stage.kl_beta=0.1",
                  "stage.clip_range=0.5", "optim.lr=3e-2", "ema.decay=0")
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer._core_model().state_dict().items()}
    trainer.fit()
    rollout_log_prob = trainer.stage.current["rollout"].log_prob
    (lp1, old1), (lp2, old2) = backpropagated
    assert torch.equal(old1, rollout_log_prob) and torch.equal(old2, rollout_log_prob)
    assert (lp2 - old2).abs().max() > 1e-4  # the second update is off-policy: its ratio can clip
    after = trainer._core_model().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_lora_name(k) for k in changed), sorted(changed)[:5]
    first, second = _rows(tmp_path)
    assert first["grpo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert first["grpo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["grpo/log_ratio_abs_max"] < 1e-5
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


def test_full_fine_tune_keeps_the_initial_weights_as_reference_across_resume(tmp_path):
    """``lora.rank=0``: every parameter may train, and the KL is to the starting weights (``trainer.init_from``).
    4 updates (2 per rollout) in one run equal 2, a checkpoint, then 2 in a new trainer: the resumed run's
    reference is the original weights read again from ``init_from`` (not the resumed ones: the KL of step 3
    would be 0), and a resume whose ``init_from`` holds other weights, or is gone, stops with one line. Catches a reference
    that follows the policy (KL stays 0), a policy left holding the reference's weights after the KL pass (the
    second update's ratio back at 1), a reference taken after the checkpoint is loaded."""
    from lcv_train.errors import CheckpointError
    from lcv_train.training.trainer import Trainer

    common = ["stage.updates_per_rollout=2", "stage.kl_beta=0.1", "stage.clip_range=0.5", "optim.lr=1e-3",
              "ema.decay=0", "lora.rank=0", "trainer.checkpoint_every=2"]
    one = Trainer(_config(tmp_path, "trainer.max_steps=4", "run.name=one", *common))
    one.fit()
    Trainer(_config(tmp_path, "trainer.max_steps=2", "run.name=split", *common)).fit()
    resumed = Trainer(_config(tmp_path, "trainer.max_steps=4", "run.name=split", *common))
    assert resumed.progress.step == 2
    resumed.fit()
    a, b = _rows(tmp_path, "one"), _rows(tmp_path, "split")
    assert a[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-12) and a[1]["grpo/kl"] > 0
    assert abs(a[1]["grpo/ratio_max"] - 1) > 1e-4 or abs(a[1]["grpo/ratio_min"] - 1) > 1e-4
    assert a[2]["grpo/kl"] > 0  # a new rollout, still away from the reference
    for ra, rb in zip(a[2:], b[2:]):
        for k in ("grpo/kl", "grpo/ratio_min", "grpo/ratio_max", "train/loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-12), (ra["step"], k)
    for p, q in zip(one.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-9)
    for r, p in zip(resumed.stage.reference, one.stage.reference):
        assert torch.equal(r, p)
    write_published_tiny(tmp_path / "other", seed=4)
    with pytest.raises(CheckpointError, match=r"^stage grpo: this full fine-tune's KL reference .* \(fingerprint "
                                              r"differs\); resume with the trainer.init_from"):
        Trainer(_config(tmp_path, "trainer.max_steps=6", "run.name=split", f"trainer.init_from={tmp_path / 'other'}",
                        *common))
    with pytest.raises((FileNotFoundError, ConfigError)) as missing:  # the reference's source is gone
        Trainer(_config(tmp_path, "trainer.max_steps=6", "run.name=split", f"trainer.init_from={tmp_path / 'gone'}",
                        *common))
    assert str(tmp_path / "gone") in str(missing.value) and "\n" not in str(missing.value)


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
    assert all(r["grpo/reward/brightness_test_flat_groups"] == 0.0 for r in rows)  # a continuous reward
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
    assert row["grpo/reward/prompt_recorder_test_flat_groups"] == 1.0  # every group scored alike


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


def _figures_on_two_ranks(rank: int, world_size: int) -> None:
    from types import SimpleNamespace

    from lcv_train.rl import grpo_loss
    from lcv_train.stages.grpo import job_figures

    old = torch.zeros(4)
    if rank == 0:  # on-policy, at the reference
        out = grpo_loss(old.clone(), old, torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5, 0.25, clip_range=0.2,
                        kl_beta=0.1, mean=torch.zeros(4, 3), mean_ref=torch.zeros(4, 3), std=torch.ones(4, 1))
    else:  # every ratio e^0.5 (clipped at 1.2), KL 0.5 per sample
        out = grpo_loss(old + 0.5, old, torch.tensor([2.0, 0.0, 0.0, -2.0]), 0.5, 0.25, clip_range=0.2,
                        kl_beta=0.1, mean=torch.ones(4, 3), mean_ref=torch.zeros(4, 3), std=torch.ones(4, 1))
    ctx = SimpleNamespace(dims=SimpleNamespace(dp_size=2, group=lambda name: None), device=torch.device("cpu"))
    f = job_figures(out.stats, ctx)
    e = math.exp(0.5)
    w = 2.0  # sqrt(0.5 / 0.5) / sqrt(0.25)
    policy = w * (-2 * 1.2 + 2 * e)  # rank 1's A = 2 clipped at 1.2, A = -2 unclipped; rank 0's sum to 0
    expect = {"kl": 0.25, "clip_fraction": 0.5, "ratio_mean": (1 + e) / 2, "ratio_min": 1.0, "ratio_max": e,
              "advantage_mean": 0.0, "advantage_std": 1.5**0.5, "advantage_abs_max": 2.0, "weight_mean": w,
              "policy_loss": policy / 8, "loss": (policy + 4 * 0.1 * w**2 * 0.5) / 8, "log_ratio_abs_max": 0.5}
    assert set(f) == set(expect)
    for k, v in expect.items():
        assert f[k] == pytest.approx(v, rel=1e-6, abs=1e-12), (rank, k)


def test_loss_figures_are_the_mean_over_data_parallel_ranks():
    """Two gloo ranks with different samples log the same figures: those of all 8 samples in closed form
    (KL 0.25, clip fraction 0.5, ratio mean (1 + e^0.5) / 2, min 1, max e^0.5, ...), not rank 0's (0, 0, 1)."""
    from tests.parallel._dist import run_distributed

    run_distributed(_figures_on_two_ranks, 2)


def test_rollout_videos_reach_the_logger_with_prompt_and_rewards(tmp_path, monkeypatch):
    """``stage.video_every=2``: rollouts 1 and 3 (steps 1 and 3) log ``stage.video_count`` videos through the
    metrics logger's one video path (``LoggedVideo`` -> ``wandb.Video``), captioned with their prompt, rewards
    and advantage; rollout 2 logs none; metrics.jsonl names the files."""
    import wandb

    from data_loaders.decode import probe_video
    from lcv_train.training.trainer import Trainer

    logged: list[tuple[int, dict]] = []

    class FakeRun:
        url = "fake"

        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    cfg = _config(tmp_path, "trainer.max_steps=3", "logger=wandb", "logger.mode=online", "stage.video_every=2",
                  "stage.video_count=3", "stage.rewards=[brightness_test,motion]", "stage.reward_weights=[1.0,1.0]")
    trainer = Trainer(cfg)
    trainer.fit()
    frames = trainer.codec.decode(torch.zeros(1, *trainer.codec.latent_shape(2, 16, 16))).shape[2]  # stage.frames=2
    videos = {step: {k: v for k, v in row.items() if k.startswith("grpo/video/")} for step, row in logged}
    assert [sorted(videos[s]) for s in (1, 2, 3)] == [["grpo/video/000", "grpo/video/001", "grpo/video/002"], [],
                                                      ["grpo/video/000", "grpo/video/001", "grpo/video/002"]]
    prompts = {"a red circle moves right", "a blue square moves up", "a green ball falls"}
    rows = _rows(tmp_path)
    for step in (1, 3):
        for key, v in videos[step].items():
            assert isinstance(v, wandb.Video)
            prompt, scores, adv = v._caption.split(" | ")
            assert prompt in prompts and scores.startswith("brightness_test ") and ", motion " in scores
            assert adv.startswith("advantage ")
            entry = rows[step - 1][key]
            assert entry["caption"] == v._caption and entry["video"] == f"grpo_videos/step_{step:07d}/{key[-3:]}.mp4"
            info = probe_video((tmp_path / "runs" / "r" / entry["video"]).read_bytes())
            assert (info["num_frames"], info["height"], info["width"]) == (frames, 16, 16), info


def test_grpo_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^stage\.sde_window: must satisfy 1 <= start"):
        _config(tmp_path, "stage.sde_window=[0,2]")
    with pytest.raises(ConfigError, match=r"^stage\.reward_weights: must have one weight per reward"):
        _config(tmp_path, "stage.rewards=[motion,brightness_test]")
    with pytest.raises(ConfigError, match=r"^stage\.prompts: no such file"):
        _config(tmp_path, f"stage.prompts={tmp_path / 'missing.txt'}")


def test_full_fine_tune_with_a_kl_is_refused_under_zero3(tmp_path):
    """ZeRO-3 keeps a shard of each parameter, so the whole-weights reference cannot be swapped in: one line
    at start-up naming the fixes; fsdp, zero2 and kl_beta=0 are accepted (LoRA runs need fsdp anyway)."""
    from lcv_train.stages import build_stage

    cfg = _config(tmp_path, "lora.rank=0", "stage.kl_beta=0.01", "parallel.engine=zero3")
    with pytest.raises(ConfigError, match=r"^stage\.kl_beta: a full fine-tune's KL reference .* parallel\.engine=fsdp "
                                          r"\(.*\) or zero2, or stage\.kl_beta=0$"):
        build_stage(cfg.stage, cfg)
    for ok in (["stage.kl_beta=0"], ["parallel.engine=zero2"], ["parallel.engine=fsdp"]):
        cfg = _config(tmp_path, "lora.rank=0", "stage.kl_beta=0.01", "parallel.engine=zero3", *ok)
        build_stage(cfg.stage, cfg)


def _cli_overrides(tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves right\na blue square moves up\na green ball falls\n")
    write_published_tiny(tmp_path / "pub", seed=3)
    return [f"run.root={tmp_path / 'runs'}", "logger=none", "model=tiny", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}", "synthetic.n=4",
            "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16", "data.buckets=[[5,16,16]]",
            "data.batch_size=2", "data.num_workers=0", "trainer.sample_at_end=false", "trainer.device=cpu",
            "stage=grpo", f"stage.prompts={prompts}", "stage.frames=2", "stage.height=16", "stage.width=16",
            "stage.steps=3", "stage.sde_window=[1,3]", "stage.group_size=4", "stage.prompts_per_step=2",
            "stage.guidance=2.0", "lora.rank=4", "lora.alpha=4.0", f"trainer.init_from={tmp_path / 'pub'}",
            "stage.kl_beta=0.1", "stage.clip_range=0.2", "optim.lr=1e-2", "stage.updates_per_rollout=2",
            "trainer.max_steps=3", "parallel.mixed_precision=fp32"]


@pytest.mark.slow
def test_fsdp_two_ranks_with_cp2_or_dp2_take_the_updates_of_one_process(tmp_path):
    """One process holding the job's 4 prompts per rollout is the reference for FSDP2 on 2 gloo ranks, with
    cp=2 (one replica holding the 4 prompts) and with dp=2 (2 prompts per rank). Each takes the same 3 updates
    (2 on the first rollout, 1 on the second): the same prompts, noise, critical steps and rewards (prompt k's
    draws depend on the seed, the rollout and k, not on the rank holding it), the same advantages and logged
    figures (dp=2's ratio, KL, clip fraction and advantage figures are the mean over both ranks' samples), the
    same loss and the same LoRA weights after the last update. Catches: a rank drawing its own noise or
    prompts, groups split across ranks, advantages normalised per rank, figures that are rank 0's.

    Tolerances: the runs compute the same sums in another order (cp: attention split across ranks; dp:
    gradients averaged by FSDP's reduce-scatter), fp32 rounding, ~1e-7 relative per operation; the rewards of
    the slightly different videos and everything after them follow. Measured (this tiny model): figures differ
    by at most 3e-6 absolute (the loss, the policy term and the advantage mean are near-zero differences of
    O(1) terms), the weights by up to 1.9e-4 (cp; 2.5e-5 before the word-level text stand-in changed the
    rollouts) and 5e-6 (dp): Adam divides by sqrt(v), so where a LoRA gradient is near zero a rounding-size
    gradient difference moves the update by a fraction of lr. The bounds: figures rel 1e-4 or abs 1e-5;
    weights abs 1e-3, against the 3e-2 that 3 Adam steps at lr 1e-2 can move them. A rank with its own noise or
    prompts, or rank 0's figures, differ by O(1) in the figures and O(lr) in the weights."""
    from tests.training._runs import lcv_train
    from tests.training.test_distributed_train import saved_tensors, torchrun

    o = _cli_overrides(tmp_path)
    lcv_train(o + ["run.name=one", "stage.prompts_per_step=4"], cwd=tmp_path)
    torchrun(o + ["run.name=cp", "stage.prompts_per_step=4", "parallel=fsdp", "parallel.cp=2",
                  "parallel.backend=gloo"], cwd=tmp_path)
    torchrun(o + ["run.name=dp", "stage.prompts_per_step=2", "parallel=fsdp", "parallel.backend=gloo"], cwd=tmp_path)
    one = _rows(tmp_path, "one")
    assert [r.get("grpo/videos_scored") for r in one] == [16, None, 32]
    assert [sum(r[f"grpo/critical_step/{i}"] for i in (1, 2)) for r in (one[0], one[2])] == [4, 4]
    assert one[0]["grpo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert one[1]["grpo/kl"] > 0 and one[1]["grpo/ratio_max"] - one[1]["grpo/ratio_min"] > 1e-4  # it moved
    final = "checkpoints/step_0000003"
    weights = saved_tensors(tmp_path / "runs" / "one" / final, "engine.model.")
    for name in ("cp", "dp"):
        rows = _rows(tmp_path, name)
        assert len(rows) == 3
        for a, b in zip(one, rows):
            assert set(b) == set(a), (name, sorted(set(a) ^ set(b)))
            for k, v in a.items():
                if isinstance(v, (int, float)) and k.startswith(("grpo/", "train/loss", "train/grad_norm")):
                    assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (name, a["step"], k)
        theirs = saved_tensors(tmp_path / "runs" / name / final, "engine.model.")
        assert set(theirs) == set(weights) and weights
        diff = max(float((theirs[k] - weights[k]).abs().max()) for k in weights)
        assert diff < 1e-3, (name, diff)
