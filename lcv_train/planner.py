"""``lcv-plan``: per-GPU memory and step FLOPs of a training layout, before you submit the job.

    lcv-plan model=longcat-13.6b parallel=fsdp world_size=256 data.bucket=[93,480,832]
    lcv-plan model=longcat-13.6b parallel=fsdp_tp2 parallel.cp=2 parallel.activation_checkpointing=1 world_size=64 gpu=h200 data=shards

Arguments are Hydra overrides of ``conf/train.yaml`` plus the planner's own keys: ``world_size`` (default
8), ``data.bucket=[frames,height,width]`` in pixels (default: the first of ``data.buckets`` with ``data=shards``,
else the model's published bucket: [93,480,832] for longcat-13.6b; other models need it), ``batch``
(samples per data-parallel rank per micro-step; default 1), ``text_len`` (512),
``gpu`` (name for peak FLOP/s and memory: h100, h200, a100, ...; default h100), ``mfu`` (assumed model FLOPs
utilisation for the time estimate; 0.4), ``json=true`` (machine-readable output).

How the numbers are made
------------------------
Parameters, gradients, optimizer: the real model is built on the meta device and parallelised with the
real code (``parallelize_model``: megatron-core TP, FSDP2 ``fully_shard`` on the real device mesh) under a
fake process group of ``world_size`` ranks (``torch.testing._internal.distributed.fake_pg``); the per-rank
numbers are the local shard sizes of rank 0 (the largest, FSDP pads the last shards). fp32 master weights
and gradients (4 + 4 bytes per local element), AdamW moments (8 bytes). Transient: FSDP all-gathers one
block ahead, so two blocks' bf16 parameters and one block's fp32 unsharded gradients are live at once.
DeepSpeed ZeRO cannot be built on a fake process group: its numbers come from the same formulas
(ZeRO-2: bf16/fp32 full parameters on every rank, gradients and optimizer partitioned; ZeRO-3:
everything partitioned).

Activations (bf16 compute, per latent token per block), measured with saved-tensor hooks on the DiT block
(``measure_block_activation_bytes``; ``tests/parallel/test_planner.py`` checks the formula against it)::

    per_block = 34*D + (40*D + 8*F) / tp     bytes per token (D hidden, F FFN hidden)

- 34*D replicated across TP ranks: fp32 LayerNorm inputs and normalised values of the two modulations
  (16D), the fp32 gated branch outputs (8D), bf16 inputs of the linears and of the cross-attention (10D);
- 40*D split by heads: q/k/v (6D), fp32 QK-RMSNorm and RoPE intermediates (24D), attention inputs and
  output (10D);
- 8*F: SwiGLU's w1 and w3 outputs, the SiLU and the product (bf16).

Tokens per rank are ``tokens / cp``, padding included (``parallel/context_parallel/layout.py``). With
activation checkpointing every k-th block, a checkpointed block keeps only its bf16 input (2*D per token)
and one block is recomputed at a time during backward::

    acts = tokens/cp * batch * (n_ckpt * 2*D + (depth - n_ckpt) * per_block + [n_ckpt > 0] * per_block)

Text tokens, the embedders, the loss and attention workspaces are not counted (a few % at video sizes).

FLOPs (matmuls, per sample): ``2 * tokens * (4*D^2 + 2*D^2 + 3*D*F)`` per block for the video-token
linears, ``2 * text * 2*D^2`` per block for the text K/V, ``4 * tokens^2 * D`` self-attention (times
``1 - sparsity`` with block-sparse attention) and ``4 * tokens * text * D`` cross-attention per block, plus
patch embedding, caption embedder and final layer. A training step is 3x forward (model FLOPs, what MFU
counts) and 4x forward for checkpointed blocks (hardware FLOPs).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lcv_train.errors import ConfigError

GIB = 2 ** 30
VAE_STRIDE = (4, 8, 8)  # Wan 2.1 VAE: causal in time (first frame alone), 8x8 in space
GPU_MEMORY_GIB = {"h100": 80, "h200": 141, "h800": 80, "a100": 80, "a800": 80, "b200": 180, "l40s": 48, "cpu": 0}
PLANNER_KEYS = ("world_size", "data.bucket", "batch", "text_len", "gpu", "mfu", "json")


# -- shapes ---------------------------------------------------------------------------------------

def latent_grid(bucket, patch=(1, 2, 2), vae_stride=VAE_STRIDE) -> tuple[int, int, int]:
    """Pixel bucket ``(frames, height, width)`` -> patch-token grid ``(T, h, w)``."""
    f, hgt, wid = (int(v) for v in bucket)
    st, sh, sw = vae_stride
    if (f - 1) % st or hgt % (sh * patch[1]) or wid % (sw * patch[2]):
        raise ConfigError(f"data.bucket: {list(bucket)} must have frames = 1 + {st}k and height/width divisible "
                          f"by {sh * patch[1]}x{sw * patch[2]} (VAE stride x patch)")
    return ((f - 1) // st + 1) // patch[0], hgt // sh // patch[1], wid // sw // patch[2]


# -- formulas -------------------------------------------------------------------------------------

def block_activation_bytes_per_token(model_cfg, tp: int = 1) -> float:
    D, F = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    return 34 * D + (40 * D + 8 * F) / tp


def activation_bytes(model_cfg, tokens: int, batch: int, cp: int = 1, tp: int = 1, ckpt_every: int = 0) -> float:
    depth = model_cfg.depth
    n_ckpt = 0 if not ckpt_every else len(range(0, depth, ckpt_every))
    per_block = block_activation_bytes_per_token(model_cfg, tp)
    per_token = n_ckpt * 2 * model_cfg.hidden_size + (depth - n_ckpt) * per_block + (per_block if n_ckpt else 0)
    return math.ceil(tokens / cp) * batch * per_token


def forward_flops(model_cfg, grid, text_len: int) -> float:
    """Matmul FLOPs of one sample's forward (see the module docstring)."""
    D, F, depth = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.depth
    n = grid[0] * grid[1] * grid[2]
    attn_frac = 1.0
    if getattr(model_cfg, "attention", "dense") == "bsa" and grid[0] > 1:
        attn_frac = 1.0 - model_cfg.bsa.sparsity if model_cfg.bsa.sparsity is not None else 1.0
    per_block = (2 * n * (6 * D * D + 3 * D * F) + 2 * text_len * 2 * D * D
                 + 4 * n * n * D * attn_frac + 4 * n * text_len * D)
    patch = math.prod(model_cfg.patch_size)
    embed = 2 * n * model_cfg.in_channels * patch * D + 2 * text_len * (model_cfg.caption_channels * D + D * D)
    final = 2 * n * D * patch * model_cfg.out_channels
    return depth * per_block + embed + final


def measure_block_activation_bytes(model_cfg, grid=(2, 16, 16), text_len: int = 16,
                                   dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes per token that one DiT block saves for backward, measured on CPU with saved-tensor hooks
    (unique storages, parameters excluded). The block runs in ``dtype`` except its AdaLN modulation (fp32),
    as under the FSDP2 mixed-precision policy."""
    from lcv_train.model.dit import LongCatDiT

    torch.manual_seed(0)
    model = LongCatDiT(model_cfg)
    block = model.blocks[0]
    for name, child in block.named_children():
        if name != "adaLN_modulation":
            child.to(dtype)
    T, h, w = grid
    D = model_cfg.hidden_size
    x = torch.randn(1, T, h * w, D, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, T, model_cfg.adaln_tembed_dim)
    y = torch.randn(1, text_len, D, dtype=dtype)
    cos, sin = model._rope(grid, "cpu")
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t is not x and ptr not in param_storages:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, temb, y, None, cos, sin, 0, grid, model.attention_op)
    return sum(saved.values()) / (T * h * w)


# -- the real sharding on meta ----------------------------------------------------------------------

@dataclass
class ShardInfo:
    params_total: int
    params_local: int  # elements this rank keeps (fp32 master)
    block_local_unsharded: int  # one block's elements after TP, before FSDP (what an all-gather materialises)
    measured: bool  # True when read from the real FSDP2/TP sharding
    notes: list[str] = field(default_factory=list)


def _fake_world(world_size: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def real_sharding(model_cfg, pcfg, world_size: int) -> ShardInfo:
    """Build the model on meta and parallelise it for ``world_size`` ranks on a fake process group."""
    import torch.distributed as dist

    from lcv_train.model.dit import LongCatDiT
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize_model

    dims = ParallelDims.from_config(pcfg, world_size)
    dims.check_model(model_cfg)
    with torch.device("meta"):
        model = LongCatDiT(model_cfg)
    total = model.num_parameters()
    if pcfg.engine != "fsdp":
        stage = 3 if pcfg.engine == "zero3" else 2
        local = math.ceil(total / world_size) if stage == 3 else total
        block = sum(p.numel() for p in model.blocks[0].parameters())
        return ShardInfo(total, local, block, False, [f"{pcfg.engine}: from formulas (DeepSpeed cannot run on a fake "
                                                      "process group)"])
    notes = []
    _fake_world(world_size)
    try:
        dims.build_mesh("cpu")
        dims.device = torch.device("cuda")  # choose the GPU mixed-precision policy
        pcfg = type(pcfg)(**{**pcfg.__dict__, "compile": False})  # compile changes nothing in the layout
        with torch.device("meta"):
            parallelize_model(model, dims, pcfg)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        block = 0
        for p in model.blocks[0].parameters():
            if hasattr(p, "to_local"):
                block += p.to_local().numel() * dims.fsdp_size
            else:
                block += p.numel()
    finally:
        dist.destroy_process_group()
    return ShardInfo(total, local, block, True, notes)


# -- the plan -------------------------------------------------------------------------------------

def plan(model_cfg, pcfg, world_size: int, bucket, batch: int = 1, text_len: int = 512, gpu: str = "h100",
         mfu: float = 0.4, shards: ShardInfo | None = None) -> dict:
    from parallel.device_info import peak_flops_by_name
    from parallel.dims import ParallelDims

    pcfg.validate()
    dims = ParallelDims.from_config(pcfg, world_size)
    dims.check_model(model_cfg)
    grid = latent_grid(bucket, model_cfg.patch_size)
    tokens = grid[0] * grid[1] * grid[2]
    # Context parallelism tiles each frame (padded to equal tiles): activations follow the padded count.
    cp_layout = None
    sharded_tokens = tokens
    if dims.cp > 1:
        from parallel.context_parallel.layout import choose_layout, tile_unit

        unit = tile_unit(model_cfg.attention, pcfg.cp_mode, model_cfg.bsa.chunk_3d_shape_q,
                         model_cfg.bsa.chunk_3d_shape_k)
        cp_layout = choose_layout(grid[1], grid[2], dims.cp, unit, pcfg.cp_split_hw)
        sharded_tokens = grid[0] * cp_layout.padded[0] * cp_layout.padded[1]
    shards = shards or real_sharding(model_cfg, pcfg, world_size)
    P_local, P_block = shards.params_local, shards.block_local_unsharded
    offload = pcfg.cpu_offload
    bf16 = pcfg.mixed_precision == "bf16"
    cbytes = 2 if bf16 else 4
    if pcfg.engine == "zero2":
        params = shards.params_total * cbytes + (4 * shards.params_total / world_size if bf16 else 0)
        grads = 4 * shards.params_total / world_size  # DeepSpeed's reduce buckets not counted
        optim = 8 * shards.params_total / world_size
        transient = 0.0
    else:
        params = 4 * P_local
        grads = 4 * P_local
        optim = 8 * P_local
        transient = 2 * cbytes * P_block + 4 * P_block
    if offload:
        params = grads = optim = 0.0
    acts_full = activation_bytes(model_cfg, sharded_tokens, batch, dims.cp, dims.tp, 0)
    acts = activation_bytes(model_cfg, sharded_tokens, batch, dims.cp, dims.tp, pcfg.activation_checkpointing)
    acts_ckpt_all = activation_bytes(model_cfg, sharded_tokens, batch, dims.cp, dims.tp, 1)
    fwd = forward_flops(model_cfg, grid, text_len) * batch
    depth = model_cfg.depth
    n_ckpt = 0 if not pcfg.activation_checkpointing else len(range(0, depth, pcfg.activation_checkpointing))
    global_batch = batch * dims.dp_size
    model_flops = 3 * fwd * dims.dp_size
    hw_flops = model_flops + fwd * dims.dp_size * n_ckpt / depth
    per_gpu = model_flops / world_size
    peak = peak_flops_by_name(gpu) or 989e12
    total_mem = params + grads + optim + transient + acts
    return {
        "layout": dims.describe(), "engine": pcfg.engine, "gpu": gpu,
        "bucket": list(bucket), "latent_grid": list(grid), "tokens_per_sample": tokens,
        "tokens_per_rank": math.ceil(sharded_tokens / dims.cp) * batch, "global_batch": global_batch,
        "cp_layout": cp_layout.describe() if cp_layout else None,
        "params_total": shards.params_total, "params_local": P_local, "sharding_measured": shards.measured,
        "mem_gib": {"params": params / GIB, "grads": grads / GIB, "optimizer": optim / GIB,
                    "fsdp_transient": transient / GIB, "activations": acts / GIB,
                    "activations_no_ckpt": acts_full / GIB, "activations_ckpt_every_block": acts_ckpt_all / GIB,
                    "total": total_mem / GIB, "device": GPU_MEMORY_GIB.get(gpu.lower(), float("nan"))},
        "flops": {"forward_per_sample": fwd / batch, "step_model": model_flops, "step_hardware": hw_flops,
                  "step_model_per_gpu": per_gpu},
        "step_time_s_at_mfu": per_gpu / (peak * mfu), "mfu_assumed": mfu, "peak_flops": peak,
        "notes": shards.notes,
    }


def format_plan(p: dict) -> str:
    m, f = p["mem_gib"], p["flops"]
    lines = [
        f"layout        {p['layout']}  engine={p['engine']}",
        f"bucket        {p['bucket']} px -> latent grid {p['latent_grid']} = {p['tokens_per_sample']} tokens/sample; "
        f"{p['tokens_per_rank']} tokens/rank/micro-step; global batch {p['global_batch']}",
        *([f"context par.  {p['cp_layout']}"] if p.get("cp_layout") else []),
        f"parameters    {p['params_total'] / 1e9:.2f}B total, {p['params_local'] / 1e6:.1f}M on this rank "
        f"({'real FSDP2/TP sharding on meta' if p['sharding_measured'] else 'formula'})",
        "memory / GPU (GiB)",
        f"  params (fp32 master)     {m['params']:8.2f}",
        f"  grads                    {m['grads']:8.2f}",
        f"  optimizer (AdamW)        {m['optimizer']:8.2f}",
        f"  FSDP gather buffers      {m['fsdp_transient']:8.2f}",
        f"  activations              {m['activations']:8.2f}   (no checkpointing {m['activations_no_ckpt']:.2f}, "
        f"every block {m['activations_ckpt_every_block']:.2f})",
        f"  total                    {m['total']:8.2f}   of {m['device']} on {p['gpu']}"
        + ("   DOES NOT FIT" if m["device"] == m["device"] and m["total"] > m["device"] else ""),
        f"FLOPs         forward {f['forward_per_sample'] / 1e12:.1f} TFLOP/sample; step {f['step_model'] / 1e15:.2f} "
        f"PFLOP (model), {f['step_hardware'] / 1e15:.2f} PFLOP (with recompute); "
        f"{f['step_model_per_gpu'] / 1e12:.1f} TFLOP/GPU",
        f"step time     ~{p['step_time_s_at_mfu']:.2f} s at {p['mfu_assumed']:.0%} MFU "
        f"({p['peak_flops'] / 1e12:.0f} TFLOP/s peak)",
    ]
    lines += [f"note          {n}" for n in p["notes"]]
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------------

def _split_args(argv):
    ours, hydra_overrides = {}, []
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+")
        if "=" in a and key in PLANNER_KEYS:
            ours[key] = a.split("=", 1)[1]
        else:
            hydra_overrides.append(a)
    return ours, hydra_overrides


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import conf

    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def plan_from_args(argv) -> dict:
    import yaml
    from omegaconf import OmegaConf

    from conf.parsing import from_mapping
    from lcv_train.model.config import DiTConfig
    from parallel.config import ParallelConfig

    ours, overrides = _split_args(argv)
    c = compose(overrides)
    model_cfg = DiTConfig.from_json_dict(OmegaConf.to_container(c.model, resolve=True))
    pdict = OmegaConf.to_container(c.parallel, resolve=True)
    pcfg = from_mapping(ParallelConfig, pdict, "parallel").validate()
    from parallel.dims import ParallelDims

    ParallelDims.from_config(pcfg, int(ours.get("world_size", 8))).check_model(model_cfg)  # layout errors first
    bucket, source = _bucket(ours, c)
    if not (isinstance(bucket, list) and len(bucket) == 3):
        raise ConfigError(f"data.bucket: must be [frames, height, width], got {ours.get('data.bucket')!r}")
    batch = int(ours.get("batch", 1))
    p = plan(model_cfg, pcfg, int(ours.get("world_size", 8)), bucket, batch=batch,
             text_len=int(ours.get("text_len", 512)), gpu=ours.get("gpu", "h100"), mfu=float(ours.get("mfu", 0.4)))
    if source:
        p["notes"].insert(0, f"bucket: {source}; data.bucket=[frames,height,width] plans another")
    return p


# The clip a model preset was published for: what lcv-plan plans when no bucket is given.
PUBLISHED_BUCKETS = {"longcat-13.6b": ([93, 480, 832], "the published 480p 93-frame bucket of longcat-13.6b")}


def _bucket(ours: dict, c) -> tuple[list, str | None]:
    """The bucket to plan and, when it was not given as ``data.bucket``, where it came from: the first of
    ``data.buckets`` of a data config of your own (``data=shards``), else the model preset's published
    bucket. The embedded default's tiny synthetic clip is never planned silently: that is an error."""
    import yaml

    if "data.bucket" in ours:
        return yaml.safe_load(ours["data.bucket"]), None
    if not c.synthetic.enabled:
        return list(c.data.buckets[0]), "the first of data.buckets"
    model = c.hydra.runtime.choices.get("model")
    if model in PUBLISHED_BUCKETS:
        bucket, source = PUBLISHED_BUCKETS[model]
        return list(bucket), source
    raise ConfigError(f"data.bucket: give the clip to plan, e.g. data.bucket=[93,480,832] (frames, height, width "
                      f"in pixels); model={model} has no published bucket and the embedded synthetic data's "
                      f"{list(c.data.buckets[0])} is not a real one")


def main(argv=None) -> int:
    import logging
    import os
    import warnings

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        p = plan_from_args(argv)
    except ConfigError as e:
        print(f"lcv-plan: {e}", file=sys.stderr)
        return 2
    finally:
        logging.disable(logging.NOTSET)  # main() may run inside another program (the tests)
    as_json = _split_args(argv)[0].get("json", "false").lower() in ("1", "true", "yes")
    print(json.dumps(p, indent=1) if as_json else format_plan(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
