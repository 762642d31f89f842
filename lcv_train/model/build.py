"""``build_dit``: the one way to make a DiT to train or run: built, prepared, parallelised, filled.

Used by the trainer, the sampler CLI and GRPO's reference model. The starting weights come from the seed
(``initial_parameter``: a function of the seed and the name only), or from ``init_from``: a published
LongCat-Video folder or one of our runs / checkpoints (``lcv_train.checkpoints.init_source``).

Under FSDP2 (engine fsdp, tp 1, any dp or cp > 1) or ZeRO-3 with several ranks the DiT is built already
sharded (on the meta device, then sharded and materialised empty; or partitioned by ``deepspeed.zero.Init``)
and filled one whole tensor at a time; with ``init_from`` only rank 0 reads the weights and every rank
receives its part. No GPU ever holds the whole model, and only rank 0's host the source weights. Otherwise
(one process, ZeRO-2, tensor parallel) it is built whole on the device, loaded, then sharded.

This module imports ``parallel`` lazily, inside ``build_dit``: the model itself never does.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from lcv_train.model.config import DiTConfig
from lcv_train.model.dit import LongCatDiT, initial_parameter

log = logging.getLogger("lcv_train")


def build_dit(model_cfg: DiTConfig, dims, parallel_cfg, device: torch.device | str, *, seed: int,
              init_from: str | None = None, init_weights: str = "ema",
              prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """The DiT of ``model_cfg``, parallelised for ``dims`` / ``parallel_cfg`` (``parallel.ParallelDims`` /
    ``ParallelConfig``) on ``device``, with its starting weights.

    ``seed`` seeds torch's global generator before the model is made (the model's ``init_seed`` is drawn
    from it: the same on every rank). ``init_from``: a published LongCat-Video folder, a run directory or a
    ``step_N`` checkpoint of ours (``init_weights``: ``ema`` or ``model`` picks which of a checkpoint's
    weights; ignored for a published folder). ``prepare(model)`` runs on the plain model before
    parallelisation (a stage freezes parameters or adds LoRA adapters there); parameters it adds that the
    source lacks are drawn like a seeded start. Collective: call on every rank."""
    from lcv_train.checkpoints import init_source
    from parallel import parallelize_model

    device = torch.device(device)
    torch.manual_seed(seed)
    fsdp = parallel_cfg.engine == "fsdp" and dims.tp == 1 and dims.uses_fsdp
    zero3 = parallel_cfg.engine == "zero3" and dims.world_size > 1
    if not (fsdp or zero3):
        with device:
            model = LongCatDiT(model_cfg)
        if init_from:
            init_source(model, init_from, init_weights).load_into(model)
        if prepare is not None:
            prepare(model)
        return parallelize_model(model, dims, parallel_cfg)

    from parallel.fsdp import fill_shards
    from parallel.zero import fill_zero3, zero3_init

    with torch.device("meta") if fsdp else zero3_init(parallel_cfg, dims):
        model = LongCatDiT(model_cfg)
    # Every rank, headers and metadata only: a bad source stops all ranks alike, before any broadcast.
    source = init_source(model, init_from, init_weights) if init_from else None
    if prepare is not None:
        prepare(model)
    init_seed = model.init_seed
    model = parallelize_model(model, dims, parallel_cfg)
    if fsdp:
        model.to_empty(device="cpu" if parallel_cfg.cpu_offload else device)

    def drawn(name, p):
        return initial_parameter(name, p.shape, init_seed, device, p.dtype)

    if source is not None:
        full = source.read() if dims.rank == 0 else None
        # (called on rank 0 only; parameters the source lacks, e.g. added LoRA adapters, are drawn)
        value = lambda name, p: full[name] if name in full else drawn(name, p)  # noqa: E731
    else:
        value = drawn
    if fsdp:
        fill_shards(model, value, from_rank0=source is not None)
    else:
        fill_zero3(model, value)  # rank 0 computes or reads, DeepSpeed partitions
    if source is not None:
        log.info("loaded %s: rank 0 read it, every rank received its part", source.describe())
    return model
