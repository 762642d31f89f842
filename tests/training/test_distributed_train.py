"""The real trainer on 2 gloo ranks under torchrun (FSDP2): save on 2, resume on 2 exactly, resume on 1.

On a different world size the model, optimizer, EMA, lr schedule and step are resharded from the DCP
checkpoint; the data loader restarts its epoch (its position is per rank), which the trainer logs.
"""

import subprocess
import sys

import pytest
import torch

from tests.training._runs import env, losses, tiny_overrides, train_here
from tests.optional import needs


def torchrun(args, cwd, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "lcv_train", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def test_fsdp_two_ranks_save_resume_on_two_and_one(tmp_path):
    root, data = tmp_path / "runs", tmp_path / "data"
    o = tiny_overrides(root, data) + ["parallel=fsdp", "parallel.backend=gloo", "trainer.checkpoint_every=2",
                                      "trainer.sample_at_end=false", "data.num_workers=1"]
    torchrun(o + ["run.name=full", "trainer.max_steps=4"], cwd=tmp_path)
    torchrun(o + ["run.name=split", "trainer.max_steps=2"], cwd=tmp_path)
    p = torchrun(o + ["run.name=split", "trainer.max_steps=4"], cwd=tmp_path)
    full, split = losses(root / "full"), losses(root / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in (3, 4):
        assert split[step] == pytest.approx(full[step], rel=1e-6), step
    for rank in (0, 1):
        assert (root / "split" / "logs" / f"rank{rank}.log").is_file()
    # Two data-parallel replicas draw different noise (catches: the same noise seed on every dp rank).
    a, b = noise_states(root / "full" / "checkpoints" / "step_0000004")
    assert not torch.equal(a, b), "both data-parallel ranks drew the same noise"

    # Resume the 2-rank checkpoint on 1 process: the weights arrive unchanged (a vanishing lr keeps the
    # one extra step from moving them), and training goes on.
    step2 = root / "full" / "checkpoints" / "step_0000004"
    single = o[:]
    single[single.index("parallel=fsdp")] = "parallel=single"
    train_here(single + ["run.name=one", f"trainer.resume={step2}", "trainer.max_steps=5", "optim.lr=1e-30",
                         "ema.decay=0"])
    assert "written by 2 ranks, resuming on 1" in (root / "one" / "logs" / "rank0.log").read_text()
    assert sorted(losses(root / "one")) == [5]
    from lcv_train.checkpoints.ours import read_our_weights

    _, before = read_our_weights(step2, "model")
    _, after = read_our_weights(root / "one" / "checkpoints" / "step_0000005", "model")
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    # 20 x 20 px = a 5 x 5 token grid, which 2 cp ranks can only share with a padded row
    o = tiny_overrides(tmp / "runs", tmp / "data") + ["trainer.sample_at_end=false", "data.num_workers=1",
                                                      "run.name=ref", "trainer.max_steps=3", "synthetic.height=20",
                                                      "synthetic.width=20", "data.buckets=[[5,20,20]]"]
    train_here(o)
    return tmp, o, losses(tmp / "runs" / "ref")


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_context_parallel_training_matches_single_process(single_process_reference, mode):
    """cp=2 on 2 ranks is one data-parallel replica: same batches, same noise, so the same losses."""
    tmp, o, ref = single_process_reference
    o = [x for x in o if not x.startswith("run.name")] + [f"run.name=cp_{mode}", "parallel=fsdp", "parallel.cp=2",
                                                          f"parallel.cp_mode={mode}", "parallel.backend=gloo"]
    if mode == "ring":  # sampling with the EMA weights between steps must not change training
        o += ["trainer.sample_every=2", "sample.steps=1"]
    torchrun(o, cwd=tmp)
    if mode == "ring":
        assert sorted(p.name for p in (tmp / "runs" / "cp_ring" / "samples").glob("*.mp4")) == ["step_0000002.mp4"]
    log = (tmp / "runs" / f"cp_{mode}" / "logs" / "rank0.log").read_text()
    assert "5x5 tokens per frame as 2x1 tiles of 3x5, padding 16.7%" in log
    # The two cp ranks are one replica: the same noise stream (catches: seeding noise by the global rank).
    a, b = noise_states(tmp / "runs" / f"cp_{mode}" / "checkpoints" / "step_0000003")
    assert torch.equal(a, b), "the cp ranks of one replica drew different noise"
    got = losses(tmp / "runs" / f"cp_{mode}")
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)


def test_block_sparse_ring_training_on_a_ragged_grid_matches_single_process(tmp_path):
    """The BSA fine-tune path under cp=2: multi-task batches (condition frames), block-sparse ring attention
    on a 5 x 5 token grid that the ranks share as padded tiles of whole 2 x 2 blocks."""
    o = tiny_overrides(tmp_path / "runs", tmp_path / "data") + [
        "synthetic.frames=9", "synthetic.height=20", "synthetic.width=20", "data.buckets=[[9,20,20]]",
        "trainer.sample_at_end=false", "data.num_workers=1", "trainer.max_steps=3", "stage=multitask",
        "data.tasks={i2v: 0.5, vc: 0.5}",  # every step has condition frames
        "model.attention=bsa", "model.bsa.sparsity=0.5", "model.bsa.backend=torch",
        "model.bsa.chunk_3d_shape_q=[2,2,2]", "model.bsa.chunk_3d_shape_k=[2,2,2]"]
    train_here(o + ["run.name=one"])
    torchrun(o + ["run.name=cp", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo"], cwd=tmp_path)
    log = (tmp_path / "runs" / "cp" / "logs" / "rank0.log").read_text()
    assert "5x5 tokens per frame as 2x1 tiles of 4x6" in log
    one, cp = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "cp")
    for step in (1, 2, 3):
        assert cp[step] == pytest.approx(one[step], rel=1e-4), (step, cp, one)


def test_init_from_published_weights_on_meta_matches_single_process(single_process_reference):
    """trainer.init_from under FSDP2 (cp=2): built on meta, rank 0 reads, shards are broadcast; the losses
    equal a single process that loads the same folder, and differ from a random start."""
    tmp, o, ref = single_process_reference
    write_published_tiny(tmp / "pub", seed=7)
    o = [x for x in o if not x.startswith(("run.name", "trainer.max_steps"))] + [
        f"trainer.init_from={tmp / 'pub'}", "trainer.max_steps=2"]
    train_here(o + ["run.name=init_one"])
    torchrun(o + ["run.name=init_cp", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo",
                  "parallel.activation_checkpointing=2"], cwd=tmp)
    assert "rank 0 read it, every rank received its part" in (tmp / "runs" / "init_cp" / "logs" / "rank0.log").read_text()
    one, cp = losses(tmp / "runs" / "init_one"), losses(tmp / "runs" / "init_cp")
    for step in (1, 2):
        assert cp[step] == pytest.approx(one[step], rel=1e-4), (step, cp, one)
    assert abs(one[1] - ref[1]) > 1e-3 * abs(ref[1])  # the weights really came from the folder

    # A folder with a tensor missing stops both ranks with the same one-line error (no rank left waiting).
    from safetensors.torch import load_file, save_file

    shard = next((tmp / "pub" / "dit").glob("*.safetensors"))
    sd = load_file(str(shard))
    victim = sorted(sd)[0]
    sd.pop(victim)
    save_file(sd, str(shard))
    with pytest.raises(AssertionError, match=rf"weight '{victim}' is missing"):
        torchrun(o + ["run.name=init_bad", "parallel=fsdp", "parallel.cp=2", "parallel.backend=gloo"], cwd=tmp)


@needs("deepspeed")
def test_zero3_training_with_ema_resumes_exactly_and_exports(tmp_path):
    """DeepSpeed ZeRO-3 with an EMA of the partitioned weights: 2+1 steps equal 3 straight (weights and
    EMA), the checkpoint holds whole EMA tensors, and lcv-export writes them in the published layout."""
    root, data = tmp_path / "runs", tmp_path / "data"
    o = tiny_overrides(root, data) + ["parallel=zero3", "parallel.backend=gloo", "trainer.checkpoint_every=2",
                                      "data.num_workers=1", "ema.decay=0.5", "trainer.sample_at_end=false"]
    torchrun(o + ["run.name=full", "trainer.max_steps=3"], cwd=tmp_path)
    torchrun(o + ["run.name=split", "trainer.max_steps=2"], cwd=tmp_path)
    torchrun(o + ["run.name=split", "trainer.max_steps=3"], cwd=tmp_path)
    full, split = losses(root / "full"), losses(root / "split")
    assert split[3] == pytest.approx(full[3], rel=1e-6)
    ema_full = saved_tensors(root / "full" / "checkpoints" / "step_0000003", "ema.")
    ema_split = saved_tensors(root / "split" / "checkpoints" / "step_0000003", "ema.")
    weights = saved_tensors(root / "full" / "checkpoints" / "step_0000003", "engine.model.")
    assert ema_full.keys() == ema_split.keys() and len(ema_full) == len(weights) > 0
    for k in ema_full:
        torch.testing.assert_close(ema_split[k], ema_full[k], rtol=1e-6, atol=1e-7, msg=k)
        assert ema_full[k].shape == weights["engine.model." + k[len("ema."):]].shape  # whole tensors
    assert any(not torch.equal(ema_full[k], weights["engine.model." + k[len("ema."):]]) for k in ema_full)
    out = tmp_path / "exported"
    from lcv_train.export import main as export_main

    assert export_main([str(root / "full"), str(out), "--weights", "ema", "--dtype", "fp32"]) == 0
    from lcv_train.checkpoints import load_published_state_dict

    exported = load_published_state_dict(out)
    for k, v in ema_full.items():
        torch.testing.assert_close(exported[k[len("ema."):]], v, rtol=0, atol=0, msg=k)


@needs("deepspeed")
def test_zero3_builds_the_model_partitioned_with_the_single_process_weights(tmp_path):
    """ZeRO-3 on 2 ranks builds the DiT partitioned (deepspeed.zero.Init) and fills it tensor by tensor:
    random init equals one process's, and trainer.init_from gives exactly the published weights (checked
    in the first checkpoint; lr 1e-30 leaves the weights as they started)."""
    root, data = tmp_path / "runs", tmp_path / "data"
    o = tiny_overrides(root, data) + ["trainer.max_steps=1", "optim.lr=1e-30", "trainer.sample_at_end=false",
                                      "data.num_workers=1", "ema.decay=0"]
    zero3 = ["parallel=zero3", "parallel.backend=gloo"]
    train_here(o + ["run.name=one"])
    torchrun(o + zero3 + ["run.name=z3"], cwd=tmp_path)
    one = saved_tensors(root / "one" / "checkpoints" / "step_0000001", "engine.model.")
    z3 = saved_tensors(root / "z3" / "checkpoints" / "step_0000001", "engine.model.")
    assert one.keys() == z3.keys() and len(one) > 10
    for k in one:  # (zero-initialised weights moved by ~lr = 1e-30, differently rounded: atol 1e-20)
        torch.testing.assert_close(z3[k], one[k], rtol=0, atol=1e-20, msg=k)

    m = write_published_tiny(tmp_path / "pub", seed=11)
    torchrun(o + zero3 + ["run.name=z3_init", f"trainer.init_from={tmp_path / 'pub'}"], cwd=tmp_path)
    assert "every rank received its part" in (root / "z3_init" / "logs" / "rank0.log").read_text()
    loaded = saved_tensors(root / "z3_init" / "checkpoints" / "step_0000001", "engine.model.")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded["engine.model." + k], v.bfloat16().float(), rtol=0, atol=1e-20, msg=k)


@needs("megatron")
def test_tensor_parallel_training_resumes_exactly_with_ema(tmp_path):
    """tp=2 splits attention and FFN weights (megatron-core); model, optimizer and EMA are saved per TP rank."""
    root, data = tmp_path / "runs", tmp_path / "data"
    o = tiny_overrides(root, data) + ["parallel=fsdp_tp2", "parallel.backend=gloo", "trainer.checkpoint_every=2",
                                      "data.num_workers=1", "sample.steps=1"]
    torchrun(o + ["run.name=full", "trainer.max_steps=3", "trainer.sample_at_end=false"], cwd=tmp_path)
    torchrun(o + ["run.name=split", "trainer.max_steps=2", "trainer.sample_at_end=false"], cwd=tmp_path)
    torchrun(o + ["run.name=split", "trainer.max_steps=3"], cwd=tmp_path)  # the sample uses the EMA weights
    full, split = losses(root / "full"), losses(root / "split")
    assert split[3] == pytest.approx(full[3], rel=1e-6)
    assert (root / "split" / "samples" / "step_0000003.mp4").is_file()
    ema_full = saved_tensors(root / "full" / "checkpoints" / "step_0000003", "ema.")
    ema_split = saved_tensors(root / "split" / "checkpoints" / "step_0000003", "ema.")
    assert any("@tp1of2" in k for k in ema_full)  # both TP ranks' halves are in the checkpoint
    assert ema_full.keys() == ema_split.keys()
    for k in ema_full:
        torch.testing.assert_close(ema_split[k], ema_full[k], rtol=1e-6, atol=1e-7, msg=k)

    # The TP checkpoint consolidates to the same weights one process trains on the same batches.
    single = [x for x in o if not x.startswith("parallel")] + ["parallel=single", "run.name=single",
                                                                 "trainer.max_steps=3", "trainer.sample_at_end=false"]
    train_here(single)
    from lcv_train.checkpoints.ours import read_our_weights

    cfg, tp_weights = read_our_weights(root / "full" / "checkpoints" / "step_0000003", "model")
    _, ref = read_our_weights(root / "single" / "checkpoints" / "step_0000003", "model")
    assert tp_weights.keys() == ref.keys()
    from lcv_train.model import LongCatDiT

    torch.manual_seed(0)  # run.seed: the trainer's initial weights
    init = LongCatDiT(cfg).state_dict()
    for k in ref:  # 3 Adam steps at lr 1e-3 move each tensor by ~6e-4 to 3e-3; fp32 rounding costs ~1e-7
        moved = (ref[k] - init[k]).abs().max().item()
        assert moved > 4e-4, (k, moved)
        torch.testing.assert_close(tp_weights[k], ref[k], rtol=0, atol=2e-3 * moved, msg=k)


def write_published_tiny(folder, seed: int):
    """A tiny DiT with random weights (no AdaLN-Zero), exported in the published layout; returns the model."""
    from lcv_train.checkpoints import export_published_dit
    from lcv_train.model import LongCatDiT

    torch.manual_seed(seed)
    m = LongCatDiT.from_preset("tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.05)
    export_published_dit(m.state_dict(), m.config, folder)
    return m


def noise_states(ckpt):
    """Each rank's noise-generator state in a checkpoint (equal states after the same draws = the same seed)."""
    return [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=False)["noise_gen"] for r in (0, 1)]


def saved_tensors(ckpt, prefix):
    """Every tensor under ``prefix`` in a DCP checkpoint, read on one process."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and hasattr(m, "size")}
    dcp.load(sd, checkpoint_id=str(ckpt))
    return sd
