"""The published DiT format on its own: export then strict load round-trips, and every kind of bad folder
(missing / mis-shaped / unexpected tensor, another model's config, a truncated or missing shard) stops with
a ``CheckpointError`` or ``FileNotFoundError`` naming the file and the key, before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lcv_train.checkpoints import check_published_dit, export_published_dit, load_published_dit
from lcv_train.errors import CheckpointError
from lcv_train.model import LongCatDiT


def _random_tiny(seed: int) -> LongCatDiT:
    torch.manual_seed(seed)
    m = LongCatDiT.from_preset("tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


@pytest.fixture
def exported(tmp_path):
    m = _random_tiny(0)
    d = export_published_dit(m.state_dict(), m.config, tmp_path / "pub", max_shard_bytes=200_000, dtype=torch.float32)
    return m, d


def test_round_trip_is_exact_in_fp32_and_sharded(exported):
    m, d = exported
    assert len(list(d.glob("*.safetensors"))) > 1  # several shards + the index
    fresh = LongCatDiT.from_preset("tiny")
    load_published_dit(fresh, d.parent)  # the LongCat-Video folder or dit/ itself
    for (k, a), b in zip(fresh.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k


def _rewrite(d, edit):
    """Apply ``edit(name -> tensor dict)`` to the shard holding the first key, keeping the index in step."""
    index_path = d / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = d / sorted(set(index["weight_map"].values()))[0]
    sd = load_file(str(shard))
    edit(sd)
    save_file(sd, str(shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in sd})
    index_path.write_text(json.dumps(index))
    return sd


def test_missing_misshaped_and_unexpected_tensors_are_named(exported):
    m, d = exported
    model = LongCatDiT.from_preset("tiny")
    victim = next(iter(_rewrite(d, lambda sd: None)))
    _rewrite(d, lambda sd: sd.pop(victim))
    with pytest.raises(CheckpointError, match=rf"weight '{victim}' is missing \(1 missing in all\)"):
        check_published_dit(model, d)
    _rewrite(d, lambda sd: sd.update({victim: torch.zeros(3, 5)}))
    with pytest.raises(CheckpointError, match=rf"weight '{victim}' has shape \(3, 5\), model expects"):
        load_published_dit(model, d)
    _rewrite(d, lambda sd: sd.update({victim: m.state_dict()[victim], "lora_A.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected weight 'lora_A.weight'.*LoRA"):
        load_published_dit(model, d)


def test_other_model_truncated_and_missing_shards(exported, tmp_path):
    m, d = exported
    with pytest.raises(CheckpointError, match=r"config.json: hidden_size=.* but model.hidden_size="):
        check_published_dit(LongCatDiT.from_preset("tiny", hidden_size=2 * m.config.hidden_size), d)
    shards = sorted(d.glob("*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])  # a download cut short
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}: not a readable safetensors file"):
        check_published_dit(LongCatDiT.from_preset("tiny"), d)
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"weight shard .*{shards[-1].name} listed in"):
        check_published_dit(LongCatDiT.from_preset("tiny"), d)
    with pytest.raises(FileNotFoundError, match="point trainer.init_from at the LongCat-Video folder"):
        check_published_dit(LongCatDiT.from_preset("tiny"), tmp_path / "nowhere")


def test_check_reads_no_weights_and_works_on_meta(exported, monkeypatch):
    _, d = exported
    import lcv_train.checkpoints.published as published

    monkeypatch.setattr(published, "load_published_state_dict", lambda *a: pytest.fail("weights were read"))
    with torch.device("meta"):
        model = LongCatDiT.from_preset("tiny")
    assert check_published_dit(model, d) == d
