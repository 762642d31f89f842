"""AdamW parameter groups: weight decay on weights, none on biases, norms and embedding tables."""

from __future__ import annotations

import torch

from lcv_train.model import LongCatDiT
from parallel import ParallelConfig, build_engine, init_distributed
from parallel.engine import weight_decay_groups


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_by_name():
    """Bug caught: decay on a norm's gain or a bias (or none at all on the weights)."""
    model = LongCatDiT.from_preset("tiny")
    model.blocks[1].requires_grad_(False)
    decay, no_decay = (_names(model, g["params"]) for g in weight_decay_groups(model, 0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay  # every trainable parameter once, frozen none
    expect_no_decay = {n for n in trainable if n.endswith(".bias") or "_norm." in n}
    assert no_decay == expect_no_decay
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight", "blocks.0.pre_crs_attn_norm.weight",
            "blocks.0.cross_attn.q_norm.weight", "blocks.0.attn.qkv.bias", "x_embedder.proj.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "blocks.0.ffn.w1.weight", "x_embedder.proj.weight",
            "t_embedder.mlp.0.weight", "final_layer.linear.weight"} <= decay
    table = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3))
    decay, no_decay = (_names(table, g["params"]) for g in weight_decay_groups(table, 0.1))
    assert decay == {"1.weight"} and no_decay == {"0.weight", "1.bias"}


def test_one_adamw_step_matches_the_closed_form():
    """The engine's first AdamW step: m/sqrt(v) = g/|g| (bias-corrected), so a no-decay parameter moves by
    exactly -lr*g/(|g|+eps) and a decayed one is first scaled by (1 - lr*wd)."""
    torch.manual_seed(0)
    model = LongCatDiT.from_preset("tiny")
    lr, wd, eps = 0.01, 0.5, 1e-8
    dims = init_distributed(ParallelConfig())
    engine = build_engine(model, {"lr": lr, "weight_decay": wd, "eps": eps, "betas": (0.9, 0.999)}, dims,
                          ParallelConfig(), grad_clip=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    engine.step()
    for n, p in model.named_parameters():
        g = grads[n]
        decayed = not (n.endswith(".bias") or "norm." in n)
        start = before[n] * (1 - lr * wd) if decayed else before[n]
        torch.testing.assert_close(p.detach(), start - lr * g / (g.abs() + eps), rtol=0, atol=1e-6, msg=n)
    assert len(engine.optimizer.param_groups) == 2
