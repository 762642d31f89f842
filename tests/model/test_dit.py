"""The DiT against SPEC section 1 and independent references."""

import math

import pytest
import torch

from lcv_train.model import AttentionOp, DiTConfig, LongCatDiT, preset
from lcv_train.model.dit import timestep_embedding
from lcv_train.model.rope import apply_rope, rope_tables

# fp32 with random weights of std 0.3 (outputs of order 1-10): reordering sums costs ~1e-5 relative.
TOL = dict(rtol=1e-4, atol=1e-4)


def random_model(name="tiny", seed=0, **kw):
    """AdaLN-Zero makes a fresh model's output 0; give every weight a random value so tests can fail."""
    torch.manual_seed(seed)
    m = LongCatDiT.from_preset(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def inputs(B=2, T=4, H=8, W=6, L=7, seed=1, C=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, L, C, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    return x, t, y, mask


def test_published_parameter_names_and_13_6b_count():
    with torch.device("meta"):
        m = LongCatDiT.from_preset("longcat-13.6b")
    assert round(m.num_parameters() / 1e9, 2) == 13.58
    sd = m.state_dict()
    expected_block = {
        "adaLN_modulation.1.weight": (6 * 4096, 512), "attn.qkv.weight": (3 * 4096, 4096), "attn.qkv.bias": (3 * 4096,),
        "attn.q_norm.weight": (128,), "attn.k_norm.weight": (128,), "attn.proj.weight": (4096, 4096),
        "pre_crs_attn_norm.weight": (4096,), "pre_crs_attn_norm.bias": (4096,),
        "cross_attn.q_linear.weight": (4096, 4096), "cross_attn.kv_linear.weight": (2 * 4096, 4096),
        "cross_attn.q_norm.weight": (128,), "cross_attn.k_norm.weight": (128,), "cross_attn.proj.bias": (4096,),
        "ffn.w1.weight": (11008, 4096), "ffn.w2.weight": (4096, 11008), "ffn.w3.weight": (11008, 4096),
    }
    for k, shape in expected_block.items():
        assert tuple(sd[f"blocks.47.{k}"].shape) == shape, k
    for k, shape in {"x_embedder.proj.weight": (4096, 16, 1, 2, 2), "t_embedder.mlp.0.weight": (512, 256),
                     "t_embedder.mlp.2.weight": (512, 512), "y_embedder.y_proj.0.weight": (4096, 4096),
                     "y_embedder.y_proj.2.weight": (4096, 4096), "final_layer.linear.weight": (64, 4096),
                     "final_layer.adaLN_modulation.1.weight": (8192, 512)}.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("blocks.48.") for k in sd)
    assert "ffn.w1.bias" not in {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}


def test_rope_split_and_ffn_size():
    c = preset("longcat-13.6b")
    assert c.rope_split == (44, 42, 42)
    assert c.ffn_hidden_size == 11008


@pytest.mark.parametrize("num_cond", [0, 1, 3])
def test_shapes(num_cond):
    m = random_model()
    x, t, y, mask = inputs()
    out = m(x, t, y, mask, num_cond_latents=num_cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_adaln_zero_init_outputs_zero():
    m = LongCatDiT.from_preset("tiny")
    x, t, y, mask = inputs()
    assert torch.count_nonzero(m(x, t, y, mask)) == 0


def test_condition_tokens_ignore_noisy_tokens_and_text():
    m = random_model()
    x, t, y, mask = inputs(T=5)
    out = m(x, t, y, mask, num_cond_latents=2)
    x2 = x.clone()
    x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])
    out2 = m(x2, t * 0.3, torch.randn_like(y), mask, num_cond_latents=2)
    torch.testing.assert_close(out2[:, :, :2], out[:, :, :2], **TOL)
    # ... while noisy tokens do depend on the condition frames and on the text.
    x3 = x.clone()
    x3[:, :, :2] += 1.0
    assert (m(x3, t, y, mask, num_cond_latents=2)[:, :, 2:] - out[:, :, 2:]).abs().max() > 1e-3
    assert (m(x, t, torch.randn_like(y), mask, num_cond_latents=2)[:, :, 2:] - out[:, :, 2:]).abs().max() > 1e-3


def test_padded_text_is_excluded():
    m = random_model()
    x, t, y, mask = inputs()
    out = m(x, t, y, mask)
    y2 = y.clone()
    y2[1, 4:] = torch.randn_like(y2[1, 4:]) * 10
    torch.testing.assert_close(m(x, t, y2, mask), out, **TOL)
    # The same sample with its padding cut off gives the same result.
    out_short = m(x[1:], t[1:], y[1:, :4], mask[1:, :4])
    torch.testing.assert_close(out_short, out[1:], **TOL)


def test_kv_cache_equals_full_forward():
    m = random_model()
    x, t, y, mask = inputs(T=5)
    full = m(x, t, y, mask, num_cond_latents=2)
    cache = m.encode_condition(x[:, :, :2])
    cached = m(x[:, :, 2:], t, y, mask, cond_cache=cache)
    torch.testing.assert_close(cached, full[:, :, 2:], **TOL)


def test_per_frame_timestep_equals_broadcast_with_zero_condition():
    m = random_model()
    x, t, y, mask = inputs(T=4)
    per_frame = t[:, None].repeat(1, 4)
    per_frame[:, :1] = 0
    torch.testing.assert_close(m(x, per_frame, y, mask, num_cond_latents=1), m(x, t, y, mask, num_cond_latents=1),
                               **TOL)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 256)
    i = 5
    freq = math.exp(-math.log(10000) * i / 128)
    torch.testing.assert_close(emb[:, i], torch.cos(t * freq))
    torch.testing.assert_close(emb[:, 128 + i], torch.sin(t * freq))


def test_rope_matches_per_axis_complex_rotation():
    split = (12, 10, 10)
    grid = (3, 4, 5)
    cos, sin = rope_tables(grid, split)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 60, 2, 32, generator=g)
    out = apply_rope(x, cos, sin)
    # Reference: complex multiplication, one axis at a time, positions from an explicit meshgrid.
    tt, hh, ww = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    pos = [tt.flatten(), hh.flatten(), ww.flatten()]
    xc = torch.view_as_complex(x.double().reshape(1, 60, 2, 16, 2))
    parts, start = [], 0
    for axis, d in enumerate(split):
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        rot = torch.polar(torch.ones(60, d // 2, dtype=torch.float64), pos[axis][:, None].double() * inv)
        parts.append(xc[..., start:start + d // 2] * rot[None, :, None, :])
        start += d // 2
    ref = torch.view_as_real(torch.cat(parts, -1)).reshape(1, 60, 2, 32).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    split = (12, 10, 10)
    q = torch.randn(1, 1, 1, 32)
    k = torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        cq, sq = rope_tables((pq[0] + 1, pq[1] + 1, pq[2] + 1), split)
        ck, sk = rope_tables((pk[0] + 1, pk[1] + 1, pk[2] + 1), split)
        a = apply_rope(q, cq[pq][None], sq[pq][None])
        b = apply_rope(k, ck[pk][None], sk[pk][None])
        return (a * b).sum()

    torch.testing.assert_close(score((1, 2, 0), (0, 1, 3)), score((4, 3, 2), (3, 2, 5)), rtol=1e-4, atol=1e-4)
    assert (score((1, 2, 0), (0, 1, 3)) - score((1, 2, 0), (0, 2, 3))).abs() > 1e-4


def test_noisy_frame_positions_start_after_condition_frames():
    cos_all, _ = rope_tables((5, 2, 2), (12, 10, 10))
    cos_noisy, _ = rope_tables((3, 2, 2), (12, 10, 10), t_offset=2)
    torch.testing.assert_close(cos_noisy, cos_all[2:])


def test_latent_shape_must_fit_patch():
    m = random_model()
    x, t, y, mask = inputs(H=7)
    with pytest.raises(ValueError, match="patch_size"):
        m(x, t, y, mask)


def test_attention_runs_through_the_swappable_operator():
    class Recording(AttentionOp):
        def __init__(self):
            self.calls = []

        def self_attention(self, q, k, v, q_grid, kv_grid, clip_frames=None):
            assert clip_frames == 4  # the clip's frames, on both calls
            self.calls.append(("self", q_grid, kv_grid))
            return super().self_attention(q, k, v, q_grid, kv_grid, clip_frames)

        def cross_attention(self, q, k, v, key_mask):
            self.calls.append(("cross", q.shape[1]))
            return super().cross_attention(q, k, v, key_mask)

    m = random_model()
    x, t, y, mask = inputs(T=4, H=8, W=6)
    ref = m(x, t, y, mask, num_cond_latents=1)
    op = Recording()
    m.attention_op = op
    torch.testing.assert_close(m(x, t, y, mask, num_cond_latents=1), ref)
    depth = m.config.depth
    assert op.calls.count(("self", (1, 4, 3), (1, 4, 3))) == depth  # condition -> condition
    assert op.calls.count(("self", (3, 4, 3), (4, 4, 3))) == depth  # noisy -> all
    assert op.calls.count(("cross", 3 * 12)) == depth  # noisy tokens only


def test_config_json_round_trip(tmp_path):
    c = preset("small", attention="bsa")
    p = tmp_path / "config.json"
    import json

    p.write_text(json.dumps(c.to_json_dict()))
    c2 = DiTConfig.from_json(p)
    assert c2 == c
    assert json.loads(p.read_text())["bsa_params"]["sparsity"] == 0.9375


def test_initial_weights_depend_on_seed_and_name_only():
    from lcv_train.model.dit import init_rule, initial_parameter

    a, b = LongCatDiT.from_preset("tiny"), LongCatDiT(preset("tiny"), seed=1007)
    assert a.init_seed != b.init_seed
    c = LongCatDiT(preset("tiny"), seed=b.init_seed)
    for (name, p), q in zip(b.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p, initial_parameter(name, p.shape, b.init_seed, "cpu")), name  # no order dependence
    sd = b.state_dict()
    # AdaLN-Zero: every modulation and the output projection start at zero; norms at one; biases zero
    assert not sd["blocks.0.adaLN_modulation.1.weight"].any() and not sd["final_layer.linear.weight"].any()
    assert torch.equal(sd["blocks.0.attn.q_norm.weight"], torch.ones(b.config.head_dim))
    assert not sd["blocks.0.attn.qkv.bias"].any()
    # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out)), the conv kernel counted into fan_in
    w = sd["x_embedder.proj.weight"]
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
    assert init_rule("x_embedder.proj.weight", w.shape) == ("uniform", bound)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(sd["t_embedder.mlp.0.weight"].std().item() - 0.02) < 0.002
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], a.state_dict()["blocks.0.attn.qkv.weight"])
