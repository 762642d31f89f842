"""LoRA on a training stage (``lora.rank=...``): only the adapters train (optimizer, EMA), FSDP2 on 2 gloo
ranks equals one process, the checkpoint exports as the published LoRA file, and ZeRO / tensor parallelism
are refused at start-up with one line."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.training._runs import losses, tiny_overrides, train_here
from tests.training.test_distributed_train import torchrun, write_published_tiny

LORA = ["lora.rank=4", "lora.alpha=8.0", "optim.lr=1e-2"]


def _saved(ckpt, prefix):
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and hasattr(m, "size")}
    dcp.load(sd, checkpoint_id=str(ckpt))
    return {k[len(prefix):]: v for k, v in sd.items()}


def test_lora_run_trains_only_adapters_and_fsdp_two_ranks_match_one(tmp_path):
    """Catches: the frozen base saved at every checkpoint, adapters missing from the EMA, LoRA names breaking
    the sharded start-up from a published folder (rank 0 reads, adapters drawn from the seed), a 2-rank FSDP2
    run drifting from one process, a resume that does not continue exactly from an adapters-only checkpoint."""
    from lcv_train.export import main as export_main
    from lcv_train.lora import is_lora_name, load_published_lora

    write_published_tiny(tmp_path / "pub", seed=3)
    o = tiny_overrides(tmp_path / "runs", tmp_path / "data") + LORA + [
        f"trainer.init_from={tmp_path / 'pub'}", "trainer.max_steps=3", "trainer.checkpoint_every=3",
        "trainer.sample_at_end=false", "data.num_workers=1", "ema.decay=0.5"]
    train_here(o + ["run.name=one"])
    torchrun(o + ["run.name=fsdp", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo"], cwd=tmp_path)
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "fsdp")
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)
    split = [x for x in o if not x.startswith(("trainer.max_steps", "trainer.checkpoint_every"))]
    train_here(split + ["run.name=split", "trainer.max_steps=2", "trainer.checkpoint_every=2"])
    train_here(split + ["run.name=split", "trainer.max_steps=3", "trainer.checkpoint_every=2"])
    assert losses(tmp_path / "runs" / "split")[3] == pytest.approx(one[3], rel=1e-6)

    ckpt = tmp_path / "runs" / "one" / "checkpoints" / "step_0000003"
    model, ema = _saved(ckpt, "engine.model."), _saved(ckpt, "ema.")
    # 19 adapter tensors a block: qkv 1+3, kv 1+2, six other linears 2 each
    assert len(ema) == 2 * 19 and set(model) == set(ema) and all(is_lora_name(k) for k in ema)
    assert any(v.abs().max() > 0 for k, v in model.items() if ".lora_up." in k)  # the adapters trained

    assert export_main([str(tmp_path / "runs" / "one"), str(tmp_path / "out"), "--lora", "--dtype", "fp32"]) == 0
    from lcv_train.checkpoints import load_published_dit
    from lcv_train.lora import merge_lora
    from lcv_train.model import LongCatDiT, preset

    fresh = LongCatDiT(preset("tiny"))
    load_published_dit(fresh, tmp_path / "pub")  # the base as the run saw it (the folder is bf16)
    names = load_published_lora(fresh, tmp_path / "out" / "lora" / "lora.safetensors")
    assert len(names) == 16
    for k, v in fresh.state_dict().items():
        if is_lora_name(k):
            assert torch.equal(v, ema[k].float()), k

    # The plain export merges the adapters into the base the run recorded (its init_from).
    assert export_main([str(tmp_path / "runs" / "one"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merge_lora(fresh)
    merged = LongCatDiT(preset("tiny"))
    load_published_dit(merged, tmp_path / "merged")
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, fresh.state_dict()[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("overrides,msg", [
    (["parallel=zero2"], "lora.rank: LoRA runs need parallel.engine=fsdp and parallel.tp=1"),
    (["parallel=fsdp_tp2"], "lora.rank: LoRA runs need parallel.engine=fsdp and parallel.tp=1"),
    (["stage.trainable=blocks"], "stage.trainable: must be all with lora.rank > 0"),
    (["lora.alpha=0"], "lora.alpha: must be > 0"),
])
def test_unsupported_lora_setups_stop_with_one_line(overrides, msg):
    from omegaconf import OmegaConf

    from lcv_train.config import train_config_from_dict
    from lcv_train.errors import ConfigError
    from tests.training.test_config_cli import composed

    with pytest.raises(ConfigError) as e:
        train_config_from_dict(OmegaConf.to_container(composed(*LORA, *overrides), resolve=True))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)
    train_config_from_dict(OmegaConf.to_container(composed(*LORA), resolve=True))  # the LoRA run itself is fine
