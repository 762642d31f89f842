"""``lcv-export`` on a LoRA run's checkpoint: the adapters alone in the published LoRA format (``--lora``),
or merged into the base (the default). The checkpoint is written here the way a LoRA run lays it out
(``meta.json`` with a ``lora`` entry, DCP keys ``engine.model.<name>`` and ``ema.<name>``), holding the
adapters only, so the base comes from ``--base``."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lcv_train.checkpoints import export_published_dit, load_published_dit
from lcv_train.export import main
from lcv_train.lora import LoRAConfig, add_lora, load_published_lora, lora_state_dict
from lcv_train.model import LongCatDiT, preset

TOL = dict(rtol=1e-4, atol=1e-4)


def _random(model, seed, scale, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if only is None or only(k):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def lora_run(tmp_path):
    """(base model, model with the trained adapters, model with the EMA adapters, checkpoint, base folder)."""
    cfg = LoRAConfig(rank=4, alpha=2.0)
    base = LongCatDiT(preset("tiny"), seed=0)
    _random(base, 0, 0.3)
    trained, ema = copy.deepcopy(base), copy.deepcopy(base)
    add_lora(trained, cfg)
    add_lora(ema, cfg)
    _random(trained, 1, 0.2, only=lambda k: ".lora_" in k)
    _random(ema, 2, 0.2, only=lambda k: ".lora_" in k)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    dcp.save({"engine": {"model": lora_state_dict(trained)}, "ema": lora_state_dict(ema)}, checkpoint_id=str(ckpt))
    (ckpt / "meta.json").write_text(json.dumps({"model": base.config.to_json_dict(), "lora": asdict(cfg), "step": 3}))
    (ckpt.parent / "latest").write_text(ckpt.name)
    pub = export_published_dit(base.state_dict(), base.config, tmp_path / "base", dtype=torch.float32)
    return base.eval(), trained.eval(), ema.eval(), tmp_path / "run", pub.parent


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(1, generator=g) * 1000,
            torch.randn(1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.bool))


def test_export_lora_alone_then_load_gives_the_same_outputs(lora_run, tmp_path):
    """Catches: model weights exported instead of EMA, a file the published layout loader cannot read."""
    base, trained, ema, run, pub = lora_run
    assert main([str(run), str(tmp_path / "out"), "--lora", "--lora-name", "refinement_lora", "--base", str(pub),
                 "--dtype", "fp32"]) == 0
    fresh = copy.deepcopy(base)
    load_published_lora(fresh, tmp_path / "out" / "lora" / "refinement_lora.safetensors")
    x = _inputs()
    assert torch.equal(fresh(*x), ema(*x))
    assert not torch.allclose(fresh(*x), trained(*x), **TOL)


def test_plain_export_of_a_lora_run_merges_it_into_the_base(lora_run, tmp_path):
    base, trained, _, run, pub = lora_run
    assert main([str(run), str(tmp_path / "out"), "--weights", "model", "--base", str(pub), "--dtype", "fp32"]) == 0
    merged = LongCatDiT(preset("tiny"))
    load_published_dit(merged, tmp_path / "out")
    x = _inputs()
    torch.testing.assert_close(merged.eval()(*x), trained(*x), **TOL)
    assert not torch.allclose(merged(*x), base(*x), **TOL)


def test_lora_export_errors_are_one_line(lora_run, tmp_path, capsys):
    _, _, _, run, _ = lora_run
    assert main([str(run), str(tmp_path / "out")]) == 2
    assert "holds the LoRA only and records no init_from; pass --base" in capsys.readouterr().err
    meta = run / "checkpoints" / "step_0000003" / "meta.json"
    m = json.loads(meta.read_text())
    del m["lora"]
    meta.write_text(json.dumps(m))
    assert main([str(run), str(tmp_path / "out"), "--lora"]) == 2
    assert "is not a LoRA run (its meta.json has no lora entry); export it without --lora" in capsys.readouterr().err


def test_merged_export_takes_the_base_from_the_checkpoint_when_it_holds_it(lora_run, tmp_path):
    """A checkpoint that saved the frozen base too needs no ``--base``."""
    _, trained, _, run, _ = lora_run
    ckpt = tmp_path / "full" / "step_0000001"
    dcp.save({"engine": {"model": trained.state_dict()}}, checkpoint_id=str(ckpt))
    (ckpt / "meta.json").write_text((run / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert main([str(ckpt), str(tmp_path / "out"), "--weights", "model", "--dtype", "fp32"]) == 0
    merged = LongCatDiT(preset("tiny"))
    load_published_dit(merged, tmp_path / "out")
    x = _inputs()
    torch.testing.assert_close(merged.eval()(*x), trained(*x), **TOL)


def test_init_from_a_lora_run_starts_from_the_base_with_the_adapters_merged(lora_run):
    """trainer.init_from=<LoRA run>: its checkpoint holds only the adapters; the start is the base its meta.json
    records (init_from) with the EMA (default) or model adapters merged in."""
    from lcv_train.checkpoints import init_source

    base, trained, ema, run, pub = lora_run
    meta_file = run / "checkpoints" / "step_0000003" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "init_from": str(pub)}))
    x = _inputs()
    for weights, want in (("ema", ema), ("model", trained)):
        start = LongCatDiT(preset("tiny")).eval()
        init_source(start, run, weights).load_into(start)
        assert not any(".lora_" in k for k in start.state_dict())
        torch.testing.assert_close(start(*x), want(*x), **TOL)
    assert not torch.allclose(ema(*x), trained(*x), **TOL)
