"""``stage=refine_lora`` (the refinement expert, SPEC 4.6) on the tiny model and synthetic clips, in process:
its loss falls, only the LoRA tensors change, it runs the block-sparse operator, its checkpoint holds only the
adapters and their EMA, and the exported published-format LoRA file loads into a fresh model that gives the
trained model's outputs. The target and timestep are checked against closed forms in
``tests/diffusion/test_refine.py``; the published file layout in ``tests/model/test_lora.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_distributed_train import saved_tensors, write_published_tiny

TINY = ["synthetic.n=16", "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16", "data.buckets=[[5,16,16]]",
        "data.batch_sizes=[]", "data.batch_size=4", "data.fps=8", "data.num_workers=0", "trainer.sample_at_end=false",
        "trainer.device=cpu", "lora.rank=4", "lora.alpha=8.0", "schedule.kind=constant", "schedule.warmup_steps=0"]


def _config(tmp_path: Path, *extra):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import conf
    from lcv_train.config import train_config_from_dict

    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=r", "logger=none", "model=tiny", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}",
                 "stage=refine_lora", f"trainer.init_from={tmp_path / 'pub'}", *TINY, *extra]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        cfg = compose("train", overrides=overrides)
    return train_config_from_dict(OmegaConf.to_container(cfg, resolve=True))


@pytest.fixture
def one_thread():
    """The tiny model is fastest on one thread; on a shared, loaded box more threads cost 20x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items()}


def _held_out_loss(trainer, batch) -> float:
    """The refine loss of one fixed batch at fixed sigmas and noise (8 draws): a paired before/after measure."""
    z_up = trainer.stage.upsampled_latents(batch, trainer.codec, trainer.device)
    with torch.no_grad():
        return sum(float(trainer.stage.loss(trainer._core_model(), batch, z_up, torch.Generator().manual_seed(s))[0])
                   for s in range(8)) / 8


def _inputs(num_cond=1):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 16, 5, 8, 8, generator=g), torch.tensor([[0.0] * num_cond + [400.0] * (5 - num_cond)] * 2),
            torch.randn(2, 7, 32, generator=g), torch.ones(2, 7, dtype=torch.bool))


def test_refine_lora_trains_only_the_adapters_and_exports_them(tmp_path, monkeypatch, one_thread):
    """Catches: base weights that move (bit-exact compare of every base tensor), the frozen base or a dense
    fallback (BSA calls counted at the kernel entry), the base written to checkpoints, an export that does not
    reproduce the trained (EMA) model, a loss that does not fall."""
    import kernels.bsa
    from lcv_train.checkpoints import load_published_dit
    from lcv_train.export import main as export_main
    from lcv_train.lora import is_lora_name, load_published_lora, published_lora_state_dict, read_published_lora
    from lcv_train.model import LongCatDiT
    from lcv_train.stages import RefineStage
    from lcv_train.training.trainer import Trainer

    calls = {"n": 0}
    real = kernels.bsa.block_sparse_attention

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(kernels.bsa, "block_sparse_attention", counting)
    write_published_tiny(tmp_path / "pub", seed=3)
    steps = 30
    cfg = _config(tmp_path, f"trainer.max_steps={steps}",
                  f"trainer.checkpoint_every={steps}", "optim.lr=1e-2", "ema.decay=0.5")
    trainer = Trainer(cfg)
    assert isinstance(trainer.stage, RefineStage) and trainer.stage.lora.rank == 4
    core = trainer._core_model()
    assert core.attention_op.name == "bsa"
    before = {k: v.detach().clone() for k, v in core.state_dict().items()}
    from data_loaders import build_loader

    held_out = trainer.to_stage_batch(next(iter(build_loader(trainer._data_config(), 0, 1, seed=99))))
    assert held_out.pixels is not None  # the synthetic shards hold pixels: the degradation runs on them
    loss_before = _held_out_loss(trainer, held_out)
    assert sum(is_lora_name(k) for k in before) == 2 * 19
    calls["n"] = 0
    summary = trainer.fit()
    training_calls = calls["n"]

    loss_after = _held_out_loss(trainer, held_out)
    print("refine held-out loss", loss_before, loss_after, [round(h["loss"], 3) for h in summary["history"]])
    assert loss_after < 0.85 * loss_before, (loss_before, loss_after)
    assert training_calls >= steps * cfg.model.depth  # every block's self-attention, every step, went through BSA
    changed = 0
    for k, v in core.state_dict().items():
        if is_lora_name(k):
            changed += not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), f"base tensor {k} changed"
    assert changed >= 2 * 16  # every adapter's up projection moved off zero

    ckpt = Path(summary["run_dir"]) / "checkpoints" / f"step_{steps:07d}"
    model_sd = _strip(saved_tensors(ckpt, "engine.model."), "engine.model.")
    ema_sd = _strip(saved_tensors(ckpt, "ema."), "ema.")
    assert set(model_sd) == set(ema_sd) == {k for k in before if is_lora_name(k)}
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert not [k for k in keys if "blocks." in k and not is_lora_name(k)]  # no base tensor, no base optimizer state

    # export --lora -> a fresh model (base from init_from) gives the EMA model's outputs
    assert export_main([summary["run_dir"], str(tmp_path / "out"), "--lora", "--lora-name", "refinement_lora",
                        "--dtype", "fp32"]) == 0
    path = tmp_path / "out" / "lora" / "refinement_lora.safetensors"
    fresh = LongCatDiT(cfg.model)
    load_published_dit(fresh, tmp_path / "pub")
    assert len(load_published_lora(fresh, path)) == 16
    fresh.eval(), trainer.model.eval()
    x = _inputs()
    with torch.no_grad(), trainer.ema.swapped_in():
        want = core(*x, num_cond_latents=1)
    torch.testing.assert_close(fresh(*x, num_cond_latents=1), want, rtol=0, atol=1e-6)
    # the file round-trips: what the loaded model writes back is the file, key for key
    from safetensors.torch import load_file

    on_disk = load_file(str(path))
    back = published_lora_state_dict(fresh)
    assert set(back) == set(on_disk) and all(torch.equal(back[k], on_disk[k]) for k in on_disk)
    assert all(e["alpha_scale"] == 2.0 for e in read_published_lora(path).values())


def test_latent_shards_are_decoded_before_the_degradation(tmp_path):
    """With shards of latents (no pixels) the refiner's input comes from the decoded latents: with the exactly
    invertible stand-in codec it equals the input made from the pixels."""
    from lcv_train.encoders import build_video_codec
    from lcv_train.stages import StageBatch, build_stage

    cfg = _config(tmp_path)
    stage = build_stage(cfg.stage, cfg)
    codec = build_video_codec(cfg.vae)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 5, 16, 16), generator=g, dtype=torch.uint8)
    latents = codec.encode(pixels.float() / 127.5 - 1)
    text, mask = torch.zeros(2, 4, 32), torch.ones(2, 4, dtype=torch.bool)
    from_pixels = stage.upsampled_latents(StageBatch(latents, text, mask, 1, pixels=pixels), codec, "cpu")
    from_latents = stage.upsampled_latents(StageBatch(latents, text, mask, 1), codec, "cpu")
    assert from_pixels.shape == latents.shape
    torch.testing.assert_close(from_latents, from_pixels, rtol=0, atol=1e-6)
    assert not torch.allclose(from_pixels, latents, atol=1e-2)  # degraded


@pytest.mark.parametrize("overrides,msg", [
    (["lora.rank=0"], "lora.rank: stage.kind=refine (refine_lora) trains a LoRA on the base model"),
    (["data.buckets=[[4,16,16]]"], "data.buckets[0]: 4 frames is not 1 + 2k"),
    (["stage.spatial_factor=0.5"], "stage.spatial_factor: must be >= 1"),
    (["trainer.init_from=null"], "trainer.init_from: stage.kind=refine (refine_lora) refines a trained base model"),
])
def test_refine_config_errors_are_one_line(tmp_path, overrides, msg):
    from lcv_train.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _config(tmp_path, *overrides)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_refine_lora_resumes_exactly(tmp_path, one_thread):
    """A run stopped after step 2 and resumed gives the uninterrupted run's step-3 loss. Catches randomness in
    the refine step that the checkpoint does not restore (a generator of the stage's own, not saved): the
    degradation is deterministic, sigma and noise come from the step's generator."""
    import json

    from lcv_train.training.trainer import Trainer

    write_published_tiny(tmp_path / "pub", seed=3)

    def run(name, steps):
        Trainer(_config(tmp_path, f"run.name={name}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=2")).fit()
        rows = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["train/loss"] for r in map(json.loads, rows)}

    straight = run("straight", 3)
    run("split", 2)
    resumed = run("split", 3)
    assert resumed[3] == pytest.approx(straight[3], rel=1e-6) and resumed[2] == straight[2]
