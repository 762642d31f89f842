"""Bad layouts fail at start-up with one ConfigError line naming the key, before any process group or
device memory exists; every conf/parallel preset composes into a valid ParallelConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcv_train.errors import ConfigError
from lcv_train.model.config import preset
from parallel import ParallelConfig, ParallelDims
from parallel.device_info import peak_flops, peak_flops_by_name


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_layout_must_divide_world_size():
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(ParallelConfig(tp=4), world_size=6)
    assert _one_line(e).startswith("parallel:") and "world size 6" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(ParallelConfig(dp_shard=3, cp=2), world_size=8)
    assert "!= world size 8" in _one_line(e)


def test_layout_resolves_dp_shard():
    d = ParallelDims.from_config(ParallelConfig(dp_replicate=2, cp=2, tp=2), world_size=256)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.dp_size, d.fsdp_size) == (2, 32, 2, 2, 64, 64)


def test_heads_not_divisible_by_tp():
    dims = ParallelDims.from_config(ParallelConfig(tp=4), world_size=4)
    with pytest.raises(ConfigError) as e:
        dims.check_model(preset("tiny"))  # 2 heads
    assert _one_line(e).startswith("parallel.tp:") and "num_heads=2" in str(e.value)


def test_heads_not_divisible_by_cp_with_ulysses():
    dims = ParallelDims.from_config(ParallelConfig(cp=4, cp_mode="ulysses"), world_size=4)
    with pytest.raises(ConfigError) as e:
        dims.check_model(preset("tiny"))
    assert _one_line(e).startswith("parallel.cp:") and "ulysses" in str(e.value)
    # ring attention keeps every head on every rank: no constraint
    ParallelDims.from_config(ParallelConfig(cp=4, cp_mode="ring"), world_size=4).check_model(preset("tiny"))


def test_zero_rejects_tp_and_cp():
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(ParallelConfig(engine="zero3", tp=2), world_size=4)
    assert _one_line(e).startswith("parallel.engine:")


def test_bad_values_name_the_key():
    for kwargs, key in [(dict(engine="ddp"), "parallel.engine"), (dict(tp=0), "parallel.tp"),
                        (dict(cp_mode="zigzag"), "parallel.cp_mode"), (dict(mixed_precision="fp16"),
                                                                       "parallel.mixed_precision")]:
        with pytest.raises(ConfigError) as e:
            ParallelConfig(**kwargs).validate()
        assert _one_line(e).startswith(key + ":")


@pytest.mark.parametrize("name", ["single", "fsdp", "hsdp", "zero2", "zero3", "fsdp_cp4", "fsdp_tp2"])
def test_presets_compose(name):
    from hydra import compose, initialize_config_dir

    import conf

    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        c = compose(config_name="train", overrides=[f"parallel={name}", "parallel.cp=2"] if name == "fsdp" else
                    [f"parallel={name}"])
    p = ParallelConfig(**c.parallel).validate()
    assert p.name == name
    if name == "fsdp":
        assert p.cp == 2
    if name == "fsdp_cp4":
        assert p.cp == 4
    if name == "fsdp_tp2":
        assert p.tp == 2


def test_peak_flops_table():
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops("cpu") > 0


def test_checkpoint_from_other_model_config_is_one_line():
    import torch

    from lcv_train.errors import CheckpointError
    from lcv_train.model.dit import LongCatDiT
    from parallel import TorchEngine

    def engine(**kw):
        m = LongCatDiT.from_preset("tiny", **kw)
        return TorchEngine(m, torch.optim.AdamW(m.parameters()))

    saved = engine(hidden_size=128).state_dict()
    with pytest.raises(CheckpointError) as e:
        engine().load_state_dict(saved)
    assert "\n" not in str(e.value) and "another model config" in str(e.value)
    saved = engine(depth=3).state_dict()
    with pytest.raises(CheckpointError) as e:
        engine().load_state_dict(saved)
    assert "unexpected" in str(e.value)
    e2 = engine()
    e2.load_state_dict(engine().state_dict())  # same config loads


def test_init_distributed_checks_the_model_first(monkeypatch):
    from parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:  # raised before any process group exists
        init_distributed(ParallelConfig(tp=2, dp_shard=1), preset("tiny", num_heads=1, hidden_size=64))
    assert str(e.value).startswith("parallel.tp:")
