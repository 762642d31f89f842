"""Real parallel layouts on 2 CPU processes (gloo) train like one process on the same data.

Each data-parallel rank gets its half of the global batch; the single-process reference uses the whole
batch (tensor-parallel ranks share data). Everything is fp32, so the only differences are summation
order: losses and grad norms must agree to 1e-5 relative; parameters after 3 AdamW steps (lr 1e-2,
clipping active) to 5e-4 absolute (lr / 20: Adam divides by sqrt(v), which amplifies float rounding on
elements with small gradients).

All layouts run one after the other in the same two worker processes (one spawn, one import of torch,
DeepSpeed and megatron-core), each on a fresh device mesh.
"""

from __future__ import annotations

import os

import pytest
import torch

import _layouts as L
from _spawn import run_ranks
from tests.optional import missing_reason, require

LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-4

LAYOUTS = {
    "fsdp": dict(name="fsdp", engine="fsdp"),  # (also checks a state_dict round trip, like zero2/zero3)
    "hsdp": dict(name="hsdp", engine="fsdp", dp_replicate=2),
    "fsdp_ac": dict(name="fsdp", engine="fsdp", activation_checkpointing=1),
    "hsdp_offload_ac2": dict(name="hsdp", engine="fsdp", dp_replicate=2, cpu_offload=True, activation_checkpointing=2),
    "tp2": dict(name="fsdp_tp2", engine="fsdp", tp=2),
    "cp2_ring": dict(name="fsdp_cp2", engine="fsdp", cp=2, cp_mode="ring"),
    "cp2_ulysses": dict(name="fsdp_cp2", engine="fsdp", cp=2, cp_mode="ulysses"),
    "zero2": dict(name="zero2", engine="zero2"),
    "zero3": dict(name="zero3", engine="zero3"),
    "zero2_accum2": dict(name="zero2", engine="zero2", accum=2),  # 2 micro-batches of 1 sample per step
    "fsdp_accum2": dict(name="fsdp", engine="fsdp", accum=2),
}


ROUNDTRIP = ("fsdp", "tp2", "zero2", "zero3", "fsdp2_tp2", "hsdp2_cp2")


def _run_layout(layout, ckpt_dir=None):
    import torch.distributed as dist

    from lcv_train.training.ema import build_ema
    from parallel import ParallelConfig, build_engine, init_distributed, parallelize_model

    layout = dict(layout)
    accum = layout.pop("accum", 1)
    cfg = ParallelConfig(**layout)
    dims = init_distributed(cfg)
    if layout.get("name") == "fsdp_bf16":
        return _run_bf16_policy(dims, cfg)
    model = parallelize_model(L.make_model(), dims, cfg)
    opt = L.make_optimizer(model) if cfg.engine == "fsdp" else dict(lr=L.LR, betas=(0.9, 0.95), eps=1e-8,
                                                                     weight_decay=0.1)
    engine = build_engine(model, opt, dims, cfg, grad_clip=L.GRAD_CLIP, grad_accum_steps=accum)
    ema = build_ema(model, L.EMA_DECAY) if dims.tp == 1 else None  # TP's EMA: see the trainer tests
    n = L.GLOBAL_BATCH // dims.dp_size
    losses, norms = L.train(engine, L.make_batches(), dims.dp_rank * n, (dims.dp_rank + 1) * n, accum, ema)
    assert dims.tp == 1 or dist.get_world_size(dims.group("tp")) == dims.tp
    if cfg.compile:
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0, "torch.compile compiled nothing"
    full = engine.full_model_state_dict()  # TP shards reassembled into the published layout
    ema_full = _check_ema(engine, ema) if ema is not None else None
    if ckpt_dir is not None:
        _check_state_roundtrip(engine, dims, cfg, opt, n, ckpt_dir)
    return losses, norms, full, dims.dp_rank, ema_full


def _check_ema(engine, ema) -> dict:
    """The EMA's whole tensors; inside ``swapped_in`` the engine's model computes with them (its loss on a
    batch equals a plain model's holding those weights), and afterwards with its own weights again; a
    state dict loads back into the same averages."""
    batch = L.make_batches(1, seed=42)[0]
    full = {k: v.detach().clone() for k, v in L.full_tensors(ema.state_dict()).items()}
    plain = L.make_model(seed=3)
    plain.load_state_dict(full)
    with torch.no_grad():
        before = L.loss_fn(engine.model, batch).item()
        with ema.swapped_in():
            swapped = L.loss_fn(engine.model, batch).item()
        after = L.loss_fn(engine.model, batch).item()
    assert swapped == pytest.approx(L.loss_fn(plain, batch).item(), rel=1e-5) and after == before != swapped
    ema.load_state_dict({k: 2 * v for k, v in ema.state_dict().items()})
    for k, v in L.full_tensors(ema.state_dict()).items():
        torch.testing.assert_close(v, 2 * full[k], rtol=0, atol=0)
    ema.load_state_dict({k: v / 2 for k, v in ema.state_dict().items()})
    return full


def _check_state_roundtrip(engine, dims, cfg, opt, n, ckpt_dir):
    """engine.state_dict() saved with DCP and loaded into a fresh engine (other initial weights) continues
    identically (the state dicts DCP dedups as replicated must really be replicated)."""
    import torch.distributed.checkpoint as dcp

    from parallel import build_engine, parallelize_model

    dcp.save(engine.state_dict(), checkpoint_id=ckpt_dir)
    model2 = parallelize_model(L.make_model(seed=7), dims, cfg)
    opt2 = L.make_optimizer(model2) if cfg.engine == "fsdp" else opt
    engine2 = build_engine(model2, opt2, dims, cfg, grad_clip=L.GRAD_CLIP)
    if cfg.engine == "fsdp":  # create the optimizer state DCP loads into (the trainer's checkpointer does this too)
        L.train(engine2, L.make_batches(1, seed=5), 0, 1)
    sd = engine2.state_dict()
    dcp.load(sd, checkpoint_id=ckpt_dir)
    engine2.load_state_dict(sd)
    more = L.make_batches(2, seed=99)
    lo, hi = dims.dp_rank * n, (dims.dp_rank + 1) * n
    a, b = L.train(engine, more, lo, hi), L.train(engine2, more, lo, hi)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=0)
    full_a, full_b = engine.full_model_state_dict(), engine2.full_model_state_dict()
    for k, v in full_a.items():
        torch.testing.assert_close(full_b[k], v, rtol=0, atol=1e-6)


def _run_bf16_policy(dims, cfg):
    """The GPU mixed-precision policy, run on CPU: bf16 compute in the blocks, fp32 AdaLN/timestep/final
    layer, fp32 sharded master weights; returns the losses and the dtypes each part computed in."""
    from parallel import build_engine, parallelize_model

    dims.device = torch.device("cuda")  # only selects the policy; nothing is allocated on a GPU
    model = parallelize_model(L.make_model(), dims, cfg)
    dims.device = torch.device("cpu")
    seen = {}
    watch = {"qkv": model.blocks[0].attn.qkv, "adaLN": model.blocks[0].adaLN_modulation[1],
             "final": model.final_layer.linear, "t_embedder": model.t_embedder.mlp[0], "ffn": model.blocks[1].ffn.w2}
    def hook(key):
        def record(mod, inputs, out):
            seen.setdefault(key, (mod.weight.dtype, out.dtype))
        return record

    for key, mod in watch.items():
        mod.register_forward_hook(hook(key))
    engine = build_engine(model, L.make_optimizer(model), dims, cfg, grad_clip=L.GRAD_CLIP)
    n = L.GLOBAL_BATCH // dims.dp_size
    losses, norms = L.train(engine, L.make_batches(), dims.dp_rank * n, (dims.dp_rank + 1) * n)
    masters = {str(p.dtype) for p in model.parameters()}
    return losses, norms, {k: (str(a), str(b)) for k, (a, b) in seen.items()}, dims.dp_rank, masters


def needed_package(layout: dict) -> str | None:
    """The optional package a layout needs: DeepSpeed for the ZeRO engines, megatron-core for tp > 1."""
    if layout.get("engine", "fsdp").startswith("zero"):
        return "deepspeed"
    if layout.get("tp", 1) > 1:
        return "megatron"
    return None


def _worker(rank, world, layouts, ckpt_root=None):
    import traceback

    os.environ["DS_ACCELERATOR"] = "cpu"
    out = {}
    for name, layout in layouts.items():
        package = needed_package(layout)
        if package and missing_reason(package):  # only this layout's tests skip; the others still run
            out[name] = {"skipped": package}
            continue
        try:
            ckpt = os.path.join(ckpt_root, name) if ckpt_root and name in ROUNDTRIP else None
            out[name] = _run_layout(layout, ckpt)
        except Exception as e:
            # the other ranks may be waiting in a collective: fail the whole run (spawn stops them)
            raise RuntimeError(f"layout {name!r} failed on rank {rank}:\n{traceback.format_exc()}") from e
    return out


def _spawn(world, layouts, ckpt_root):
    try:
        return run_ranks(_worker, world, layouts, ckpt_root)
    except RuntimeError as e:
        return str(e)


def _results(runs, name):
    if isinstance(runs, str):
        pytest.fail(runs, pytrace=False)
    results = [r[name] for r in runs]
    if isinstance(results[0], dict) and "skipped" in results[0]:  # the layout's optional package is missing
        require(results[0]["skipped"])
    return results


@pytest.fixture(scope="module")
def ref():
    return L.reference()


# The first test to use ``runs`` / ``runs4`` pays for every layout of the shared spawn (about a minute and a
# half on an idle 2-core machine; several times that on a loaded one): it gets more than the suite's 300 s.
SHARED_SPAWN = pytest.mark.timeout(1200)

LAYOUTS_EXTRA = {"fsdp_bf16": dict(name="fsdp_bf16", engine="fsdp", mixed_precision="bf16")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _spawn(2, {**LAYOUTS, **LAYOUTS_EXTRA}, str(tmp_path_factory.mktemp("ckpt2")))


@SHARED_SPAWN
def test_bf16_mixed_precision_policy(runs, ref):
    """bf16 compute where SPEC allows it, fp32 where it asks for fp32, fp32 master weights; the loss
    stays within bf16 rounding of the fp32 run."""
    both = _results(runs, "fsdp_bf16")
    losses, _, dtypes, _, masters = both[0]
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    assert dtypes["qkv"] == (bf16, bf16) and dtypes["ffn"] == (bf16, bf16)
    assert dtypes["adaLN"] == (fp32, fp32) and dtypes["final"] == (fp32, fp32) and dtypes["t_embedder"] == (fp32, fp32)
    assert masters == {fp32}
    other = both[1][0]
    mean = (torch.tensor(losses) + torch.tensor(other)) / 2
    torch.testing.assert_close(mean, torch.tensor(ref[0]), rtol=3e-2, atol=0)


@SHARED_SPAWN
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_ranks_match_single_process(name, runs, ref):
    _compare(_results(runs, name), ref)


def _compare(results, ref):
    for r in results:
        assert not isinstance(r, str), r
    ref_losses, ref_norms, ref_sd, ref_ema = ref
    # each dp rank's loss is the mean over its rows; the reference is the mean over all rows
    per_dp = {r[3]: r[0] for r in results}
    mean_loss = torch.tensor([per_dp[d] for d in sorted(per_dp)]).mean(0)
    torch.testing.assert_close(mean_loss, torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    for r in results:
        torch.testing.assert_close(torch.tensor(r[1]), torch.tensor(ref_norms), rtol=LOSS_RTOL, atol=0)
    sd = results[0][2]  # full state dicts are gathered on rank 0
    assert set(sd) == set(ref_sd)
    for k, v in ref_sd.items():
        torch.testing.assert_close(sd[k].float(), v, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"{k}: {m}")
    ema = results[0][4]  # the EMA's whole tensors (None for tensor parallelism)
    if ema is not None:
        assert set(ema) == set(ref_ema)
        for k, v in ref_ema.items():
            torch.testing.assert_close(ema[k].float(), v, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"EMA {k}: {m}")



LAYOUTS_4 = {
    "fsdp2_tp2": dict(name="fsdp_tp2", engine="fsdp", tp=2),  # dp_shard 2 x tp 2
    "hsdp2_cp2": dict(name="hsdp_cp2", engine="fsdp", dp_replicate=2, cp=2),  # replicate 2 x cp 2
    "fsdp2_cp2_ac": dict(name="fsdp_cp2", engine="fsdp", cp=2, activation_checkpointing=2),  # dp_shard 2 x cp 2
}


@pytest.fixture(scope="module")
def runs4(tmp_path_factory):
    return _spawn(4, LAYOUTS_4, str(tmp_path_factory.mktemp("ckpt4")))


@SHARED_SPAWN
@pytest.mark.parametrize("name", list(LAYOUTS_4))
def test_four_ranks_match_single_process(name, runs4, ref):
    """Two parallel dims at once on 4 processes (2 cores: slow but small)."""
    _compare(_results(runs4, name), ref)


@pytest.mark.slow  # inductor compiles the block cold in ~40 s on 2 cores: affordable, and compile is a layout we ship
@SHARED_SPAWN  # a cold compile on a loaded machine passes the suite's 300 s
def test_fsdp2_checkpointing_compile_matches_single(ref):
    layout = {"fsdp_ac2_compile": dict(name="fsdp", engine="fsdp", activation_checkpointing=2, compile=True)}
    _compare(_results(_spawn(2, layout, None), "fsdp_ac2_compile"), ref)


def test_missing_optional_package_skips_only_its_layouts(monkeypatch):
    """Catches one layout's missing package failing every layout of the shared worker: with DeepSpeed and
    megatron-core reported missing, the worker runs nothing for zero2 / tp2 and their results skip with the
    reason (fail under CI); the fsdp layout's result is not touched."""
    import sys

    import _pytest.outcomes

    gone = {"deepspeed", "megatron"}
    monkeypatch.setattr(sys.modules[__name__], "missing_reason",
                        lambda m: f"{m} is not installed" if m in gone else None)
    assert needed_package(LAYOUTS["zero2"]) == "deepspeed" and needed_package(LAYOUTS["tp2"]) == "megatron"
    assert needed_package(LAYOUTS["cp2_ring"]) is None and needed_package(LAYOUTS_4["fsdp2_tp2"]) == "megatron"
    out = _worker(0, 1, {k: LAYOUTS[k] for k in ("zero2", "zero3", "tp2")})  # would need 2 ranks if it ran
    assert out == {"zero2": {"skipped": "deepspeed"}, "zero3": {"skipped": "deepspeed"}, "tp2": {"skipped": "megatron"}}
    runs = [{**out, "fsdp": ("losses",)}]
    assert _results(runs, "fsdp") == [("losses",)]
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("tests.optional.importlib.util.find_spec", lambda m: None)
    with pytest.raises(_pytest.outcomes.Skipped, match="DeepSpeed is not installed"):
        _results(runs, "zero2")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(_pytest.outcomes.Failed, match="CI is set but megatron-core is not installed"):
        _results(runs, "tp2")
