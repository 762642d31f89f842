"""Starting weights of an FSDP2 model built on the meta device (2 gloo ranks), as the trainer makes them.

Random init: every rank's shards equal the single-process model of the same seed. Published weights: only
rank 0 reads the files, every rank ends up with exactly its shard of the published tensors, and a bad
folder stops both ranks with the same error instead of hanging one of them in a broadcast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

try:
    from _dist import close_pools, get_pool
except ImportError:  # tests/parallel became a package
    from tests.parallel._dist import close_pools, get_pool


@pytest.fixture(scope="module", autouse=True)
def _pools():
    yield
    close_pools()


def _sharded_meta_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lcv_train.model import LongCatDiT

    from parallel.parallelize import apply_activation_checkpointing

    with torch.device("meta"):
        model = LongCatDiT.from_preset("tiny")
    apply_activation_checkpointing(model, 2)  # wrapped blocks (their parameter names gain a prefix)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    return model


def _check_load(rank, world, folder):
    """What the trainer does with trainer.init_from under FSDP2: rank 0 alone reads, fill_shards broadcasts."""
    from safetensors.torch import load_file

    from lcv_train.checkpoints import load_published_state_dict
    from parallel.fsdp import fill_shards
    from parallel.parallelize import canonical_name

    model = _sharded_meta_model()
    full = load_published_state_dict(folder) if rank == 0 else None

    def value(name, p):
        assert rank == 0, "fill_shards(from_rank0=True) asked another rank for a weight"
        return full[name]

    fill_shards(model, value, from_rank0=True)
    expect = {}
    for f in sorted((folder / "dit").glob("*.safetensors")):
        expect.update(load_file(str(f)))
    names = set()
    for k, v in model.state_dict().items():
        assert v.to_local().numel() < v.numel() or v.numel() < world  # really sharded
        names.add(canonical_name(k))
        torch.testing.assert_close(v.full_tensor(), expect[canonical_name(k)].float(), rtol=0, atol=0, msg=k)
    assert names == set(expect) and any("_checkpoint_wrapped_module" in k for k, _ in model.named_parameters())


def _check_bad_folder(rank, world, folder):
    """The header check works on a sharded model, on every rank (so no rank waits in a broadcast)."""
    from lcv_train.checkpoints import check_published_dit
    from lcv_train.errors import CheckpointError

    model = _sharded_meta_model()
    with pytest.raises(CheckpointError, match="is missing"):
        check_published_dit(model, folder)


def test_rank0_reads_and_every_rank_gets_its_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    from lcv_train.checkpoints import export_published_dit
    from lcv_train.model import LongCatDiT

    torch.manual_seed(0)
    m = LongCatDiT.from_preset("tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    export_published_dit(m.state_dict(), m.config, tmp_path / "pub")  # bf16, as published
    get_pool(2).run(_check_load, tmp_path / "pub")

    shard = next((tmp_path / "pub" / "dit").glob("*.safetensors"))
    sd = load_file(str(shard))
    sd.pop(next(iter(sd)))
    save_file(sd, str(shard))
    get_pool(2).run(_check_bad_folder, tmp_path / "pub")


def _check_random_init(rank, world):
    from lcv_train.model import LongCatDiT
    from lcv_train.model.dit import initial_parameter
    from parallel.fsdp import fill_shards

    torch.manual_seed(5)
    model = _sharded_meta_model()
    seed = model.init_seed
    fill_shards(model, lambda name, p: initial_parameter(name, p.shape, seed, "cpu", p.dtype))
    torch.manual_seed(5)
    whole = LongCatDiT(model.config).state_dict()  # the same seed drawn on a real device as on meta
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.full_tensor(), whole[k], rtol=0, atol=0, msg=k)


def test_random_init_of_a_sharded_model_equals_one_process():
    get_pool(2).run(_check_random_init)
