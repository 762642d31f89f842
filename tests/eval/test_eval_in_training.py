"""Evaluation inside ``lcv-train`` (eval.every, at the end): what is logged, what is written, and that it
leaves training exactly as it would have been (it draws from no training RNG and restores the model)."""

from __future__ import annotations

import json

from tests.training._runs import REPO, lcv_train, losses, tiny_overrides


def test_eval_every_and_at_end_logs_curve_scores_and_videos(tmp_path):
    data = tmp_path / "data"
    base = tiny_overrides(tmp_path / "runs", data) + ["trainer.max_steps=4", "trainer.checkpoint_every=100"]
    evals = ["eval.every=2", "eval.samples=5", "eval.batch_size=2", "eval.synthetic_n=8", "eval.num_prompts=3",
             "eval.sigmas=[0.2,0.8]"]
    p = lcv_train(base + evals + ["run.name=with"], cwd=REPO)
    lcv_train(base + ["eval.at_end=false", "run.name=without"], cwd=REPO)
    run = tmp_path / "runs" / "with"
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (2, 4):
        r = rows[step]
        assert set(r) >= {"eval/val_loss", "eval/val_loss/sigma_0.2", "eval/val_loss/sigma_0.8", "eval/compliance",
                          "eval/compliance/colour", "eval/compliance/shape", "eval/compliance/motion",
                          "eval/compliance/sharpness"}, sorted(r)
        assert r["eval/val_loss/sigma_0.2"] != r["eval/val_loss/sigma_0.8"]
        assert 0.0 <= r["eval/compliance"] <= 1.0
        folder = run / "eval" / f"step_{step:07d}"
        assert sorted(f.name for f in folder.iterdir()) == ["000.mp4", "001.mp4", "002.mp4", "prompts.txt"]
        assert r["eval/video/001"]["video"] == f"eval/step_{step:07d}/001.mp4"  # a LoggedVideo, W&B's too
        assert (run / "eval" / f"step_{step:07d}.png").stat().st_size > 0
    assert not any(k.startswith("eval/") for k in rows[1]) and not any(k.startswith("eval/") for k in rows[3])
    assert rows[2]["eval/val_loss"] != rows[4]["eval/val_loss"]  # the weights moved between evaluations
    assert "eval at step 4: val loss" in p.stdout + p.stderr and "compliance" in p.stdout + p.stderr
    # the held-out set is not the training set: another seed, in its own folder
    assert len([d for d in data.iterdir() if d.name.startswith("heldout_") and d.is_dir()]) == 1
    assert losses(run) == losses(tmp_path / "runs" / "without")


def test_eval_on_two_fsdp_ranks_equals_one_process(tmp_path):
    """FSDP2 on 2 gloo ranks evaluates the weights one process evaluated (its checkpoint, resumed with a
    vanishing lr): the same validation curve, 5 clips split 3 + 2 (the short rank must pad its forward
    passes or the run hangs), and every one of the 3 prompts' videos (split 2 + 1) written."""
    from tests.training.test_distributed_train import torchrun

    o = tiny_overrides(tmp_path / "runs", tmp_path / "data") + [
        "eval.at_end=true", "eval.samples=5", "eval.batch_size=2", "eval.synthetic_n=8", "eval.num_prompts=3",
        "ema.decay=0", "trainer.sample_at_end=false", "parallel.backend=gloo"]
    lcv_train(o + ["run.name=one", "trainer.max_steps=2"], cwd=tmp_path)  # writes videos: not in pytest
    ckpt = tmp_path / "runs" / "one" / "checkpoints" / "step_0000002"
    torchrun(o + ["run.name=two", "parallel=fsdp", f"trainer.resume={ckpt}", "trainer.max_steps=3",
                  "optim.lr=1e-30"], cwd=tmp_path)
    one, two = ({k: v for k, v in json.loads((tmp_path / "runs" / name / "metrics.jsonl").read_text()
                                              .splitlines()[-1]).items() if k.startswith("eval/")}
                for name in ("one", "two"))
    assert set(two) == set(one) and "eval/val_loss/sigma_0.5" in two
    for key in (k for k in one if k.startswith("eval/val_loss")):
        assert abs(two[key] - one[key]) <= 1e-5 * abs(one[key]), (key, two[key], one[key])
    assert sorted(f.name for f in (tmp_path / "runs" / "two" / "eval" / "step_0000003").glob("*.mp4")) == [
        "000.mp4", "001.mp4", "002.mp4"]
