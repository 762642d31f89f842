"""``lcv-sample`` end to end on tiny models: from a run folder (EMA or model weights), with a distillation
LoRA, with the refiner, from a published-format folder with a real (tiny) Wan VAE and umT5, data parallel
over prompts on 2 gloo ranks, and its one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcv_train.sampling.cli import main, parse_args, run
from tests.sampling._kit import random_tiny, write_lora, write_published, write_run


def _frames(path) -> int:
    from data_loaders.decode import probe_video

    return probe_video(path.read_bytes())["num_frames"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return write_run(root / "exp", random_tiny(0), ema=random_tiny(1))


def test_from_a_run_folder_with_ema_and_model_weights(run_dir, tmp_path):
    """Defaults from the run's sample config (5 frames 8x8); EMA and model weights give different videos."""
    out = {}
    for w in ("ema", "model"):
        assert main([f"ckpt={run_dir}", "prompt=a red circle moves to the right", f"weights={w}",
                     f"out={tmp_path / w}", "steps=2"]) == 0
        mp4 = tmp_path / w / "0000-a-red-circle-moves-to-the-right.mp4"
        assert _frames(mp4) == 5 and mp4.with_suffix(".png").is_file()
        out[w] = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(mp4.with_suffix(".png")))
    assert out["ema"].shape == out["model"].shape and not np.array_equal(out["ema"], out["model"])
    # without out=, under the run folder
    assert main([f"ckpt={run_dir / 'checkpoints' / 'step_0000001'}", "prompt=x", "steps=1", "task=vc",
                 f"video={tmp_path / 'ema' / '0000-a-red-circle-moves-to-the-right.mp4'}", "cond_frames=2"]) == 0
    assert _frames(run_dir / "samples" / "0000-x.mp4") == 5


def test_long_distill_and_refine_end_to_end(run_dir, tmp_path):
    """long=true segments=2 (5 + (5-2) = 8 frames), the distillation LoRA's schedule (4 steps here) without
    CFG, then the refiner with its own LoRA (4 steps from 0.5): 2*8-1 = 15 frames at 16x16, twice the fps."""
    lora = write_lora(tmp_path / "distill.safetensors", random_tiny(0), seed=2)
    refine_lora = write_lora(tmp_path / "refine.safetensors", random_tiny(0), seed=3)
    req = parse_args([f"ckpt={run_dir}", "prompt=a blue square moves up", "long=true", "segments=2",
                      "cond_frames=2", "distill=true", "steps=4", f"lora={lora}", "refine=true",
                      f"refine_lora={refine_lora}", "refine_steps=10",
                      "refine_height=16", "refine_width=16", f"out={tmp_path / 'o'}"])
    [path] = run(req)
    assert _frames(path) == 15 and _frames(path.with_name(path.stem + "-coarse.mp4")) == 8
    from data_loaders.decode import probe_video

    info = probe_video(path.read_bytes())
    assert (info["width"], info["height"]) == (16, 16) and info["fps"] == pytest.approx(16.0)


def test_published_folder_with_wan_vae_and_umt5(tmp_path):
    """A LongCat-Video-shaped folder (tiny Wan 2.1 VAE: 4x temporal, 8x spatial; tiny umT5 + tokenizer; shift
    from scheduler/scheduler_config.json): I2V of 5 frames at 16x16 from an image."""
    from PIL import Image

    from lcv_train.sampling.load import load_sampling_model

    root = write_published(tmp_path / "LongCat-Video")
    sm = load_sampling_model(root)
    assert sm.shift == 5.0 and not sm.null_negative and sm.codec.temporal_stride == 4
    torch.testing.assert_close(sm.model.state_dict()["blocks.0.attn.qkv.weight"],
                               random_tiny(0).state_dict()["blocks.0.attn.qkv.weight"])
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "img.png")
    assert main([f"ckpt={root}", "prompt=a cat runs on the beach", "task=i2v", f"image={tmp_path / 'img.png'}",
                 "frames=5", "height=16", "width=16", "steps=2", "negative_prompt=red car",
                 f"out={tmp_path / 'o'}"]) == 0
    assert _frames(tmp_path / "o" / "0000-a-cat-runs-on-the-beach.mp4") == 5


LONG = ["prompt=a long one", "long=true", "segments=2", "cond_frames=2", "steps=2"]


def _rank_run(rank, world, ckpt, prompts, out):
    dp = [p.name for p in run(parse_args([f"ckpt={ckpt}", f"prompts={prompts}", "steps=2", f"out={out}/dp"]))]
    cp = [p.name for p in run(parse_args([f"ckpt={ckpt}", *LONG, "cp=2", f"out={out}/cp"]))]
    return dp, cp


def _same_frames(a_png, b_png):
    """Equal to one level of 255 on under 1% of the pixels: the ranks run one thread each (and context
    parallel merges attention in pieces), so sums round differently."""
    from PIL import Image

    a, b = (np.asarray(Image.open(p)).astype(int) for p in (a_png, b_png))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_two_gloo_ranks_data_parallel_over_prompts_and_context_parallel(run_dir, tmp_path):
    """2 gloo ranks: as 2 prompt groups they split 3 prompts (rank 0: 0 and 2, rank 1: 1); with cp=2 both make
    one long video together (ring attention over H x W tiles, the condition cache sharded too) and rank 0
    writes it. Both give the frames one process gives."""
    from tests.parallel._spawn import run_ranks

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves to the right\n\na blue square moves up\na green triangle moves left\n")
    (dp0, cp0), (dp1, cp1) = run_ranks(_rank_run, 2, str(run_dir), str(prompts), str(tmp_path / "two"))
    assert [len(dp0), len(dp1)] == [2, 1] and dp1[0].startswith("0001-") and len(cp0) == 1 and cp1 == []
    run(parse_args([f"ckpt={run_dir}", f"prompts={prompts}", "steps=2", f"out={tmp_path / 'one'}"]))
    run(parse_args([f"ckpt={run_dir}", *LONG, f"out={tmp_path / 'one'}"]))
    for name in dp0 + dp1:
        _same_frames(tmp_path / "two" / "dp" / name.replace(".mp4", ".png"), tmp_path / "one" / name.replace(".mp4", ".png"))
    assert _frames(tmp_path / "two" / "cp" / cp0[0]) == 8
    _same_frames(tmp_path / "two" / "cp" / cp0[0].replace(".mp4", ".png"), tmp_path / "one" / cp0[0].replace(".mp4", ".png"))


@pytest.mark.parametrize("args,message", [
    (["prompt=x"], "ckpt: is required"),
    (["ckpt=/nope", "prompt=x"], "ckpt=/nope: no such file"),
    (["ckpt=.", "prompt=x", "steps=many"], "steps: expected an integer, got 'many'"),
    (["ckpt=.", "prompt=x", "colour=red"], "colour: unknown key"),
    (["ckpt=.", "prompt=x", "task=i2v"], "image: task=i2v needs image=<file>"),
    (["ckpt=.", "prompt=x", "distill=true"], "lora: distill=true needs lora="),
    (["ckpt=.", "prompt=x", "segments=3"], "segments: needs long=true"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcv-sample: error: ") and message in err and "\n" not in err


def test_an_exported_folder_without_encoders_names_the_fix(tmp_path, capsys):
    """An ``lcv-export`` output (dit/ only): the missing VAE is one line that says how to pick the encoders;
    with the stand-ins named, it samples."""
    from lcv_train.checkpoints import export_published_dit

    m = random_tiny(0)
    export_published_dit(m.state_dict(), m.config, tmp_path / "exp", dtype=torch.float32)
    assert main([f"ckpt={tmp_path / 'exp'}", "prompt=x", f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "vae" in err and "vae=pixel text_encoder=tiny_umt5" in err and err.count("\n") == 1
    assert main([f"ckpt={tmp_path / 'exp'}", "prompt=x", "vae=pixel", "text_encoder=tiny_umt5", "frames=3",
                 "height=8", "width=8", "steps=2", f"out={tmp_path / 'o'}"]) == 0
