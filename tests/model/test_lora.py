"""LoRA adapters (``lcv_train.lora``) against closed forms and the published LongCat LoRA layout.

References are independent of the adapter code: the closed form ``W x + b + s * blockdiag(up) down x`` is
built with ``torch.block_diag`` on a copy of the base model, and the published file in
``test_hand_written_published_file_matches_closed_form`` is written key by key from SPEC sections 1 and 9.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from lcv_train.checkpoints import check_published_dit, export_published_dit, load_published_dit
from lcv_train.errors import CheckpointError, ConfigError
from lcv_train.lora import (LoRAConfig, LoRALinear, add_lora, base_state_dict, load_published_lora, lora_modules,
                            lora_state_dict, merge_lora, published_lora_state_dict, save_published_lora,
                            unmerge_lora)
from lcv_train.model import LongCatDiT, preset
from lcv_train.model.dit import initial_parameter

# fp32, random weights of std 0.3: summation order costs ~1e-5 relative on outputs of order 1-10.
TOL = dict(rtol=1e-4, atol=1e-4)
TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.cross_attn.q_linear", "blocks.*.cross_attn.kv_linear",
           "blocks.*.cross_attn.proj", "blocks.*.ffn.w1", "blocks.*.ffn.w2", "blocks.*.ffn.w3"]


def random_base(seed=0) -> LongCatDiT:
    """AdaLN-Zero makes a fresh model's output 0; random weights make the tests able to fail."""
    m = LongCatDiT(preset("tiny"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.rand(2, generator=g) * 1000
    y = torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, y, mask


def closed_form_model(base, adapters: dict, multiplier=1.0):
    """A plain copy of ``base`` with ``W += multiplier * alpha_scale * blockdiag(ups) @ down`` per module;
    ``adapters``: ``{module name: (down [n*r, in], [up_i [out/n, r]], alpha_scale)}``."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, (down, ups, alpha_scale) in adapters.items():
            w = ref.get_submodule(name).weight
            w += multiplier * alpha_scale * (torch.block_diag(*ups) @ down)
    return ref


def adapters_of(model) -> dict:
    return {n: (m.lora_down.weight.detach(), [u.detach() for u in m.up_weights()], m.lora_alpha_scale)
            for n, m in lora_modules(model).items()}


def test_adapters_keep_published_names_change_nothing_and_freeze_the_base():
    """Catches: a base weight renamed (published loading / sharded start-up / export break), a non-zero
    initial ``lora_up`` (the adapted model would not start from the base), the base left trainable."""
    base = random_base()
    m = copy.deepcopy(base)
    names = add_lora(m, LoRAConfig(rank=4, alpha=2.0))
    assert names == [n for n in (f"blocks.{i}.{s}" for i in range(2) for s in
                                 ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                                  "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3"))]
    assert list(base_state_dict(m)) == list(base.state_dict())
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(m).items()}
    assert shapes["blocks.0.attn.qkv.lora_down.weight"] == (3 * 4, 64)
    assert shapes["blocks.0.attn.qkv.lora_up.blocks.2.weight"] == (64, 4)
    assert shapes["blocks.0.cross_attn.kv_linear.lora_down.weight"] == (2 * 4, 64)
    assert shapes["blocks.1.ffn.w2.lora_down.weight"] == (4, m.config.ffn_hidden_size)
    assert shapes["blocks.1.ffn.w2.lora_up.weight"] == (64, 4)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(shapes)
    x, t, y, mask = inputs()
    assert torch.equal(m(x, t, y, mask, num_cond_latents=1), base(x, t, y, mask, num_cond_latents=1))
    m(x, t, y, mask).square().mean().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n in shapes)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in shapes)


def test_initial_values_depend_on_seed_and_name_only():
    """Catches: adapters drawn from the global RNG (a model built on meta and filled shard by shard would
    differ from one process), the wrong Kaiming bound, a non-zero ``lora_up``."""
    a, b = LongCatDiT(preset("tiny"), seed=5), LongCatDiT(preset("tiny"), seed=5)
    add_lora(a, LoRAConfig(rank=8))
    torch.manual_seed(123)  # must not matter
    add_lora(b, LoRAConfig(rank=8))
    for (k, va), vb in zip(lora_state_dict(a).items(), lora_state_dict(b).values()):
        assert torch.equal(va, vb), k
    with torch.device("meta"):
        meta = LongCatDiT(preset("tiny"), seed=5)
    add_lora(meta, LoRAConfig(rank=8))
    meta.to_empty(device="cpu")
    for k, v in lora_state_dict(a).items():
        assert torch.equal(initial_parameter(k, v.shape, meta.init_seed, "cpu"), v), k
    down = a.get_submodule("blocks.0.ffn.w2").lora_down.weight.detach()
    bound = 1 / math.sqrt(down.shape[1])
    assert down.abs().max() <= bound and down.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert all(not v.any() for k, v in lora_state_dict(a).items() if ".lora_up." in k)


def test_forward_matches_closed_form_and_merge_matches_forward():
    """Catches: a wrong scale (alpha/rank, multiplier), fused up blocks applied to the wrong slices, merge
    not equal to the unmerged forward, unmerge not restoring the base."""
    base = random_base()
    m = copy.deepcopy(base)
    add_lora(m, LoRAConfig(rank=3, alpha=5.0, targets=TARGETS, multiplier=0.7))
    randomize_lora(m)
    ref = closed_form_model(base, adapters_of(m), multiplier=0.7)
    x, t, y, mask = inputs()
    out = m(x, t, y, mask, num_cond_latents=1)
    torch.testing.assert_close(out, ref(x, t, y, mask, num_cond_latents=1), **TOL)
    assert not torch.allclose(out, base(x, t, y, mask, num_cond_latents=1), **TOL)
    merge_lora(m)
    torch.testing.assert_close(m(x, t, y, mask, num_cond_latents=1), out, **TOL)
    unmerge_lora(m)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, t, y, mask, num_cond_latents=1), out, **TOL)


def test_published_file_round_trip_gives_identical_outputs(tmp_path):
    """Catches: a writer and loader that disagree (key names, fused blocks, alpha_scale)."""
    base = random_base()
    m = copy.deepcopy(base)
    add_lora(m, LoRAConfig(rank=4, alpha=3.0))
    randomize_lora(m)
    path = save_published_lora(published_lora_state_dict(m), tmp_path / "lora.safetensors")
    fresh = copy.deepcopy(base)
    names = load_published_lora(fresh, path)
    assert names == sorted(lora_modules(m))
    x, t, y, mask = inputs()
    assert torch.equal(fresh(x, t, y, mask), m(x, t, y, mask))
    assert not any(p.requires_grad for p in lora_state_dict(fresh).values())
    # Loading into a model that already has adapters of that shape overwrites them (and they may train).
    other = copy.deepcopy(base)
    add_lora(other, LoRAConfig(rank=4, alpha=1.0))
    load_published_lora(other, path, trainable=True)
    assert torch.equal(other(x, t, y, mask), m(x, t, y, mask))


def test_hand_written_published_file_matches_closed_form(tmp_path):
    """A file laid out by hand from SPEC sections 1 and 9 (not with our writer) loads, and the model then
    computes ``base(x) + multiplier * alpha_scale * up(down(x))``. Catches a misread key layout."""
    base = random_base()
    g = torch.Generator().manual_seed(7)
    r, scale = 3, 0.25
    pre = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___"
    sd = {
        pre + "attn___lorahyphen___qkv.lora_down.weight": torch.randn(3 * r, 64, generator=g),
        **{pre + f"attn___lorahyphen___qkv.lora_up.blocks.{i}.weight": torch.randn(64, r, generator=g)
           for i in range(3)},
        pre + "attn___lorahyphen___qkv.alpha_scale": torch.tensor(scale),
        pre + "cross_attn___lorahyphen___kv_linear.lora_down.weight": torch.randn(2 * r, 64, generator=g),
        **{pre + f"cross_attn___lorahyphen___kv_linear.lora_up.blocks.{i}.weight": torch.randn(64, r, generator=g)
           for i in range(2)},
        pre + "cross_attn___lorahyphen___kv_linear.alpha_scale": torch.tensor(scale),
        pre + "ffn___lorahyphen___w1.lora_down.weight": torch.randn(r, 64, generator=g),
        pre + "ffn___lorahyphen___w1.lora_up.weight": torch.randn(base.config.ffn_hidden_size, r, generator=g),
        pre + "ffn___lorahyphen___w1.alpha_scale": torch.tensor(scale),
    }
    save_file(sd, str(tmp_path / "refinement_lora.safetensors"))
    m = copy.deepcopy(base)
    load_published_lora(m, tmp_path / "refinement_lora.safetensors", multiplier=2.0)
    assert sorted(lora_modules(m)) == ["blocks.1.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.1.ffn.w1"]
    adapters = {}
    for name, key in (("blocks.1.attn.qkv", "attn___lorahyphen___qkv"),
                      ("blocks.1.cross_attn.kv_linear", "cross_attn___lorahyphen___kv_linear"),
                      ("blocks.1.ffn.w1", "ffn___lorahyphen___w1")):
        ups = sorted(k for k in sd if k.startswith(pre + key + ".lora_up"))
        adapters[name] = (sd[pre + key + ".lora_down.weight"], [sd[k] for k in ups], scale)
    ref = closed_form_model(base, adapters, multiplier=2.0)
    x, t, y, mask = inputs()
    torch.testing.assert_close(m(x, t, y, mask, num_cond_latents=1), ref(x, t, y, mask, num_cond_latents=1), **TOL)
    # And our writer gives back exactly the hand-made file.
    ours = published_lora_state_dict(m)
    assert sorted(ours) == sorted(sd)
    assert all(torch.equal(ours[k], sd[k].float()) for k in sd)


def test_published_dit_loading_ignores_adapters_and_names_the_lora_loader(tmp_path):
    """Catches: adapters breaking ``check_published_dit``/``load_published_dit``; the old message that
    pointed at a LoRA loader that did not exist."""
    base = random_base()
    pub = export_published_dit(base.state_dict(), base.config, tmp_path / "pub", dtype=torch.float32)
    m = LongCatDiT(preset("tiny"), seed=0)
    add_lora(m, LoRAConfig(rank=2))
    randomize_lora(m)
    lora_before = {k: v.clone() for k, v in lora_state_dict(m).items()}
    load_published_dit(m, pub.parent)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state_dict(m).items())
    assert all(torch.equal(lora_before[k], v) for k, v in lora_state_dict(m).items())
    save_file(published_lora_state_dict(m), str(pub / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"LoRA file\? load it with lcv_train.lora.load_published_lora"):
        check_published_dit(LongCatDiT(preset("tiny")), pub)


def test_bad_config_and_bad_files_are_named(tmp_path):
    m = random_base()
    with pytest.raises(ConfigError, match=r"lora.targets: pattern 'blocks.\*.attn.nope' matches no nn.Linear"):
        add_lora(copy.deepcopy(m), LoRAConfig(targets=["blocks.*.attn.nope"]))
    with pytest.raises(ConfigError, match=r"lora.rank"):
        add_lora(copy.deepcopy(m), LoRAConfig(rank=0))
    key = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w2"
    bad = {f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4),
           f"{key}.alpha_scale": torch.tensor(1.0), f"{key}.lora_A.weight": torch.zeros(1)}
    save_file(bad, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"lora_A.weight' is not in the LongCat LoRA layout"):
        load_published_lora(copy.deepcopy(m), tmp_path / "a.safetensors")
    del bad[f"{key}.lora_A.weight"]
    save_file(bad, str(tmp_path / "b.safetensors"))  # w2 maps ffn_hidden -> 64, the file 64 -> 64
    with pytest.raises(CheckpointError, match=r"ffn.w2: LoRA maps 64 -> 64 features"):
        load_published_lora(copy.deepcopy(m), tmp_path / "b.safetensors")
    bad[f"{key}.lora_down.weight"] = torch.zeros(5, m.config.ffn_hidden_size)
    save_file(bad, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match=r"lora_down has 5 rows, expected 1 up block\(s\) x rank 4"):
        load_published_lora(copy.deepcopy(m), tmp_path / "c.safetensors")


def test_lora_linear_is_still_a_linear():
    """The adapted module is the same object with the same parameters (optimizers, hooks, FSDP keep them)."""
    m = random_base()
    lin = m.blocks[0].ffn.w1
    w = lin.weight
    add_lora(m, LoRAConfig(rank=2))
    assert m.blocks[0].ffn.w1 is lin and lin.weight is w
    assert isinstance(lin, LoRALinear) and isinstance(lin, nn.Linear)
