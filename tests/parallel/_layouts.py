"""Shared pieces of the layout-equivalence tests: the tiny DiT with every weight random (so no gradient is
trivially zero, unlike the AdaLN-Zero init), fixed random inputs, an MSE loss to a fixed random target,
and a few optimizer steps. Workers run inside ``_spawn.run_ranks``."""

from __future__ import annotations

import torch

from lcv_train.model.dit import LongCatDiT

GLOBAL_BATCH = 4
STEPS = 3
LR = 1e-2
GRAD_CLIP = 0.5
EMA_DECAY = 0.9  # not 0.5, where decay and 1 - decay coincide and a swapped lerp weight would pass


def make_model(seed: int = 0, **overrides) -> LongCatDiT:
    torch.manual_seed(seed)
    model = LongCatDiT.from_preset("tiny", **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    return model


def make_batches(steps: int = STEPS, batch: int = GLOBAL_BATCH, seed: int = 123, cfg=None):
    """``steps`` global batches: (latents, timestep, text, text_mask, target), all fp32/bool, on CPU."""
    cfg = cfg or make_model().config
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lat = torch.randn(batch, cfg.in_channels, 3, 4, 4, generator=g)
        t = torch.rand(batch, generator=g) * 1000
        text = torch.randn(batch, 5, cfg.caption_channels, generator=g)
        mask = torch.ones(batch, 5, dtype=torch.bool)
        mask[::2, 3:] = False
        target = torch.randn(batch, cfg.out_channels, 3, 4, 4, generator=g)
        out.append((lat, t, text, mask, target))
    return out


def loss_fn(model, batch, num_cond: int = 1):
    lat, t, text, mask, target = batch
    out = model(lat, t, text, mask, num_cond_latents=num_cond)
    return torch.nn.functional.mse_loss(out.float(), target)


def make_optimizer(model):
    from parallel.engine import weight_decay_groups  # the groups every engine builds

    return torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8)


def train(engine, batches, lo: int = 0, hi: int | None = None, accum: int = 1, ema=None):
    """Run the steps on rows ``lo:hi`` of each global batch, in ``accum`` micro-batches per step (loss
    divided by ``accum``, as the trainer does; ``ema`` updated after each step); returns (losses, grad
    norms)."""
    losses, norms = [], []
    for b in batches:
        part = tuple(x[lo:hi] for x in b)
        total = 0.0
        for micro in zip(*(x.chunk(accum) for x in part)):
            with engine.autocast():
                loss = loss_fn(engine.model, micro) / accum
            engine.backward(loss)
            total += loss.item()
        norms.append(engine.step())
        if ema is not None:
            ema.update()
        losses.append(total)
    return losses, norms


def reference(steps: int = STEPS, **model_overrides):
    """Single-process training on whole global batches: (losses, grad norms, final state dict, EMA state
    dict)."""
    from lcv_train.training.ema import EMA
    from parallel import TorchEngine

    model = make_model(**model_overrides)
    engine = TorchEngine(model, make_optimizer(model), grad_clip=GRAD_CLIP)
    ema = EMA(model, EMA_DECAY)
    losses, norms = train(engine, make_batches(steps, cfg=model.config), ema=ema)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}, ema.state_dict()


def full_tensors(sd: dict) -> dict:
    """DTensor shards -> whole tensors (collective), plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()}
