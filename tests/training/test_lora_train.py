"""LoRA on a training stage (``lora.rank=...``): only the adapters train (optimizer, EMA), FSDP2 on 2 gloo
ranks equals one process, the checkpoint exports as the published LoRA file, and ZeRO / tensor parallelism
are refused at start-up with one line."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.training._runs import lcv_train, losses, tiny_overrides
from tests.training.test_distributed_train import torchrun, write_published_tiny

LORA = ["lora.rank=4", "lora.alpha=8.0", "optim.lr=1e-2"]


def _saved(ckpt, prefix):
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and hasattr(m, "size")}
    dcp.load(sd, checkpoint_id=str(ckpt))
    return {k[len(prefix):]: v for k, v in sd.items()}


def test_lora_run_trains_only_adapters_and_fsdp_two_ranks_match_one(tmp_path):
    """Catches: base weights moving, adapters missing from the EMA, LoRA names breaking the sharded start-up
    from a published folder (rank 0 reads, adapters drawn from the seed), a 2-rank FSDP2 run drifting from
    one process."""
    from lcv_train.export import main as export_main
    from lcv_train.lora import is_lora_name, load_published_lora

    base = write_published_tiny(tmp_path / "pub", seed=3)
    o = tiny_overrides(tmp_path / "runs", tmp_path / "data") + LORA + [
        f"trainer.init_from={tmp_path / 'pub'}", "trainer.max_steps=3", "trainer.checkpoint_every=3",
        "trainer.sample_at_end=false", "data.num_workers=1", "ema.decay=0.5"]
    lcv_train(o + ["run.name=one"], cwd=tmp_path)
    torchrun(o + ["run.name=fsdp", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo"], cwd=tmp_path)
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "fsdp")
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)

    ckpt = tmp_path / "runs" / "one" / "checkpoints" / "step_0000003"
    model, ema = _saved(ckpt, "engine.model."), _saved(ckpt, "ema.")
    assert ema and all(is_lora_name(k) for k in ema)  # the EMA tracks the adapters only
    start = base.state_dict()
    for k, v in model.items():
        if not is_lora_name(k):  # the base never moves (bf16 export of the start: compare in bf16)
            assert torch.equal(v.to(torch.bfloat16), start[k].to(torch.bfloat16)), k
    assert any(v.abs().max() > 0 for k, v in model.items() if ".lora_up." in k)  # the adapters trained

    assert export_main([str(tmp_path / "runs" / "one"), str(tmp_path / "out"), "--lora", "--dtype", "fp32"]) == 0
    fresh = write_published_tiny(tmp_path / "unused", seed=3)
    names = load_published_lora(fresh, tmp_path / "out" / "lora" / "lora.safetensors")
    assert len(names) == 16
    for k, v in fresh.state_dict().items():
        if is_lora_name(k):
            assert torch.equal(v, ema[k].float()), k


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
