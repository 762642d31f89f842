"""End-to-end CPU runs of the real ``lcv-train`` (subprocesses, tiny model, tiny synthetic shards)."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import av
import pytest
import torch

from tests.training._runs import REPO, env, lcv_train, losses, tiny_overrides, train_here


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")


def _cosine_overrides(root, data):
    return [x for x in tiny_overrides(root, data) if not x.startswith("schedule.")] + [
        "trainer.checkpoint_every=3", "schedule.kind=cosine", "schedule.warmup_steps=3", "schedule.min_lr_ratio=0.1",
        "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def full_run(runs):
    """One 6-step run (checkpoints at steps 3 and 6, W&B offline), shared: the resume test compares with it,
    the export and wrong-model tests read its checkpoint (each process start costs seconds of imports)."""
    root, data = runs
    lcv_train(_cosine_overrides(root, data) + ["run.name=full", "trainer.max_steps=6", "trainer.sample_at_end=false",
                                               "logger=wandb"], cwd=root)
    return root / "full"


def test_train_resume_continues_exactly(runs, full_run):
    """3 + 3 steps equal 6 straight, under warmup and cosine decay: the logged lr (peak 1e-3, 3 warmup
    steps, cosine to 0.1 by step 6) is the closed form at every step, the resumed run's too."""
    root, data = runs
    o = _cosine_overrides(root, data)
    assert list((full_run / "wandb").glob("offline-run-*")), "W&B should log offline without an API key"
    lcv_train(o + ["run.name=split", "trainer.max_steps=3", "trainer.sample_at_end=false"], cwd=root)
    p = lcv_train(o + ["run.name=split", "trainer.max_steps=6"], cwd=root)
    assert (p.stdout + p.stderr).count("resumed from") == 1  # printed once, not by the logger and the bar both
    full, split = losses(root / "full"), losses(root / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # same data, same noise, same weights after resume
        assert split[step] == pytest.approx(full[step], rel=1e-6), step
    # the lr after step k: (k + 1) / 3 during warmup, then 0.1 + 0.9 * (1 + cos(pi * (k - 3) / 3)) / 2
    expected = {1: 2 / 3, 2: 1.0, 3: 1.0, 4: 0.775, 5: 0.325, 6: 0.1}
    for name in ("full", "split"):
        rows = {d["step"]: d for d in map(json.loads, (root / name / "metrics.jsonl").read_text().splitlines())}
        for step, mult in expected.items():
            assert rows[step]["train/lr"] == pytest.approx(1e-3 * mult, rel=1e-6), (name, step)
            assert math.isfinite(rows[step]["train/grad_norm"]) and rows[step]["train/grad_norm"] > 0

    run = root / "split"
    assert (run / "config.yaml").is_file() and (run / "logs" / "rank0.log").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    with av.open(str(run / "samples" / "step_0000006.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 32, 3)  # two captions side by side


def test_interrupt_leaves_only_complete_checkpoints(runs, tmp_path):
    root, data = runs
    o = tiny_overrides(root, data) + ["run.name=interrupted", "trainer.checkpoint_every=1", "trainer.max_steps=500"]
    ckpts = root / "interrupted" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step_0000999.tmp").mkdir()  # what an interrupted save leaves behind
    p = subprocess.Popen([sys.executable, "-m", "lcv_train", *o], cwd=root, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (ckpts / "step_0000002").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out[-2000:]
    assert not (ckpts / "step_0000999.tmp").exists()
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert (latest / ".metadata").is_file() and (latest / "meta.json").is_file()
    published = [d for d in ckpts.iterdir() if d.is_dir() and not d.name.endswith(".tmp")]
    assert all((d / ".metadata").is_file() for d in published)
    step = int(latest.name.split("_")[1])
    p = lcv_train(o[:-1] + [f"trainer.max_steps={step + 1}", "trainer.sample_at_end=false"], cwd=root)
    assert f"at step {step}" in p.stdout + p.stderr


def test_checkpoint_from_another_model_is_refused(runs, full_run):
    root, data = runs
    # A run folder whose latest checkpoint is the shared run's (tiny, depth 2), resumed with model.depth=3.
    ckpts = root / "other" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step_0000006", ckpts / "step_0000006")
    (ckpts / "latest").write_text("step_0000006")
    o = tiny_overrides(root, data) + ["run.name=other", "trainer.sample_at_end=false"]
    p = lcv_train(o + ["trainer.max_steps=7", "model.depth=3"], cwd=root, check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert "model.depth" in err and "different model" in err


def test_export_to_published_format_loads_back(full_run, tmp_path):
    out = tmp_path / "exported"
    p = subprocess.run([sys.executable, "-m", "lcv_train.export", str(full_run), str(out), "--weights", "ema"],
                       env=env(), capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    from lcv_train.checkpoints import load_published_dit, read_dit_config
    from lcv_train.model import LongCatDiT

    m = LongCatDiT(read_dit_config(out))
    load_published_dit(m, out)
    from torch.distributed.checkpoint import load as dcp_load

    ema = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    dcp_load({"ema": ema}, checkpoint_id=str(full_run / "checkpoints" / "step_0000006"))
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, ema[n].to(torch.bfloat16).float(), msg=n)


def test_multitask_with_block_sparse_attention_trains_and_samples(runs):
    """The BSA fine-tune path: model.attention=bsa with condition frames (I2V / VC batches), from random
    published weights. Keeping every block (sparsity 0) trains exactly like dense attention (the same
    losses); at sparsity 0.5 the losses differ from dense, and the EMA sample decodes to the configured
    frames and size. (From the AdaLN-Zero init, the gates keep attention out of the first steps' losses,
    and the 4x4x4 default block covered this whole clip: sparsity then changed nothing.)"""
    from tests.training.test_distributed_train import write_published_tiny

    root, data = runs
    # Random published weights (no AdaLN-Zero), so attention already shapes the first losses.
    write_published_tiny(root / "pub_bsa", seed=3)
    o = tiny_overrides(root, data) + ["stage=multitask", "trainer.max_steps=3", "data.tasks={t2v:0.0,i2v:0.5,vc:0.5}",
                                      "sample.steps=1", f"trainer.init_from={root / 'pub_bsa'}"]
    # 2x2x2 blocks: the 4x4-token frames make 4 key blocks, so sparsity 0.5 really drops half of them
    bsa = ["model.attention=bsa", "model.bsa.backend=torch", "model.bsa.chunk_3d_shape_q=[2,2,2]",
           "model.bsa.chunk_3d_shape_k=[2,2,2]"]
    train_here(o + ["run.name=dense", "trainer.sample_at_end=false"])
    train_here(o + bsa + ["run.name=bsa_all", "model.bsa.sparsity=0.0", "trainer.sample_at_end=false"])
    # A subprocess: sampling in this process changes how the curate tests' in-process clips encode later
    # (tests/data/test_curate.py, when run after this file), so runs that sample stay out of pytest.
    lcv_train(o + bsa + ["run.name=bsa", "model.bsa.sparsity=0.5"], cwd=root)
    dense, every_block, sparse = losses(root / "dense"), losses(root / "bsa_all"), losses(root / "bsa")
    assert sorted(sparse) == [1, 2, 3]
    for step in (1, 2, 3):  # exact attention either way: fp32 rounding only (measured: identical)
        assert every_block[step] == pytest.approx(dense[step], rel=2e-6), (step, every_block, dense)
    # dropping half the blocks moves the losses by 2e-5 to 2e-4 relative (these weights attend broadly)
    assert max(abs(sparse[s] - dense[s]) / dense[s] for s in (1, 2, 3)) > 5e-5, (sparse, dense)
    with av.open(str(root / "bsa" / "samples" / "step_0000003.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 32, 3)
