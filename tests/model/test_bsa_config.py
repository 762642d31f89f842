"""Block-sparse attention in the model: the published ``bsa_params`` are all read and used, and the
dense-or-sparse decision is the published model's (dense only when the clip has one latent frame)."""

import json

import pytest
import torch

from lcv_train.errors import ConfigError
from lcv_train.model import AttentionOp, BSAConfig, DiTConfig, LongCatDiT, build_attention_op, preset
from kernels.attention_op import uses_block_sparse


def _published_config(tmp_path, **bsa_params):
    d = preset("tiny").to_json_dict()
    d.pop("bsa")  # the published file has only bsa_params
    d["bsa_params"] = bsa_params
    (tmp_path / "dit").mkdir(parents=True)
    (tmp_path / "dit" / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_every_bsa_param_of_a_published_config_is_read_and_used(tmp_path):
    """Catches a loader that drops cdf_threshold or chunk_3d_shape_k (issue 16, items 2 and 4)."""
    from lcv_train.checkpoints.published import read_dit_config

    path = _published_config(tmp_path, sparsity=0.8, cdf_threshold=0.6, chunk_3d_shape_q=[2, 4, 4],
                             chunk_3d_shape_k=[4, 2, 2])
    cfg = read_dit_config(path)
    assert (cfg.bsa.sparsity, cfg.bsa.cdf_threshold) == (0.8, 0.6)
    assert (cfg.bsa.chunk_3d_shape_q, cfg.bsa.chunk_3d_shape_k) == ((2, 4, 4), (4, 2, 2))
    cfg.attention = "bsa"
    op = build_attention_op(cfg.validate())
    assert (op.sparsity, op.cdf_threshold, op.block_shape, op.kv_block_shape, op.fp32_scores) == (
        0.8, 0.6, (2, 4, 4), (4, 2, 2), False)
    written = DiTConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict())))
    assert written == cfg
    assert cfg.to_json_dict()["bsa_params"] == {"sparsity": 0.8, "cdf_threshold": 0.6, "chunk_3d_shape_q": [2, 4, 4],
                                                "chunk_3d_shape_k": [4, 2, 2]}


def test_bsa_params_validation(tmp_path):
    from lcv_train.checkpoints.published import read_dit_config

    cdf_only = read_dit_config(_published_config(tmp_path / "a", sparsity=None, cdf_threshold=0.9))
    assert cdf_only.bsa.sparsity is None and cdf_only.bsa.cdf_threshold == 0.9
    with pytest.raises(ConfigError, match="both null"):
        read_dit_config(_published_config(tmp_path / "b", sparsity=None, cdf_threshold=None))
    with pytest.raises(ConfigError, match="unknown key.*chunk_shape"):
        read_dit_config(_published_config(tmp_path / "c", sparsity=0.9, chunk_shape=[4, 4, 4]))
    with pytest.raises(ConfigError, match="chunk_3d_shape_k"):
        read_dit_config(_published_config(tmp_path / "d", chunk_3d_shape_k=[4, 4]))


def test_bsa_settings_other_than_the_published_weights_are_named():
    from lcv_train.checkpoints.published import bsa_differences

    published = preset("tiny")
    same = preset("tiny", attention="bsa")
    assert bsa_differences(published, same) == []
    other = preset("tiny", attention="bsa", bsa=BSAConfig(sparsity=0.9, chunk_3d_shape_k=(4, 4, 8)))
    lines = bsa_differences(published, other)
    assert len(lines) == 2 and "bsa_params.sparsity=0.9375" in lines[0] and "[4, 4, 4]" in lines[1]


# ----------------------------------------------------------------------------------------------------
# Dense or sparse: the published model decides from the clip's latent frames only
# ----------------------------------------------------------------------------------------------------

def test_uses_block_sparse_rule():
    assert not uses_block_sparse(1, (1, 4, 4))
    assert not uses_block_sparse(1, (3, 4, 4))  # condition cache + one noisy frame: dense
    assert uses_block_sparse(2, (1, 4, 4))  # a one-frame condition inside a two-frame clip: sparse
    assert uses_block_sparse(None, (2, 4, 4)) and not uses_block_sparse(None, (1, 4, 4))


@pytest.fixture
def counted_bsa(monkeypatch):
    import kernels.bsa

    calls = []
    real = kernels.bsa.block_sparse_attention

    def spy(q, k, v, latent_shape, kv_latent_shape=None, **kw):
        calls.append((tuple(latent_shape), tuple(kv_latent_shape)))
        return real(q, k, v, latent_shape, kv_latent_shape, **kw)

    monkeypatch.setattr(kernels.bsa, "block_sparse_attention", spy)
    return calls


def _model():
    torch.manual_seed(0)
    m = LongCatDiT.from_preset("tiny", attention="bsa", bsa=BSAConfig(
        sparsity=0.5, chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2), backend="torch"))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def _latents(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, T, 8, 8, generator=g)


def test_dense_fallback_follows_the_clip_frames(counted_bsa):
    """Issue 16, item 5: with a condition cache and one noisy frame the published model attends densely
    (a rule reading the key grid runs BSA there); without a cache, a clip of 2 frames is sparse on both calls."""
    m = _model()
    depth = m.config.depth
    t, text = torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        m(_latents(1), t, text)
        assert counted_bsa == []  # an image
        m(_latents(2), t, text, num_cond_latents=1)
        assert counted_bsa == [((1, 4, 4), (1, 4, 4)), ((1, 4, 4), (2, 4, 4))] * depth
        counted_bsa.clear()
        assert m.encode_condition(_latents(1)) is not None and counted_bsa == []
        cache = m.encode_condition(_latents(2, seed=1))
        assert counted_bsa == [((2, 4, 4), (2, 4, 4))] * depth
        counted_bsa.clear()
        out = m(_latents(1, seed=2), t, text, cond_cache=cache)
        assert counted_bsa == []
        m.attention_op = AttentionOp()
        torch.testing.assert_close(out, m(_latents(1, seed=2), t, text, cond_cache=cache), rtol=0, atol=0)
        m.attention_op = build_attention_op(m.config)
        m(_latents(2, seed=2), t, text, cond_cache=cache)
        assert counted_bsa == [((2, 4, 4), (4, 4, 4))] * depth


def test_ring_operator_decides_like_the_single_process_one(monkeypatch):
    """The context-parallel ring operator (one rank here) applies the same clip rule and the same selection."""
    from parallel.context_parallel import make_context_parallel_op, ops

    calls = []
    real = ops.bsa_ring_attention

    def spy(q, k, v, q_grid, kv_grid, *args, **kw):
        calls.append((tuple(q_grid), tuple(kv_grid)))
        return real(q, k, v, q_grid, kv_grid, *args, **kw)

    monkeypatch.setattr(ops, "bsa_ring_attention", spy)
    single, ring = _model(), _model()
    ring.attention_op = make_context_parallel_op(ring.attention_op, None, "ring")
    depth = single.config.depth
    t, text = torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        cache_s, cache_r = single.encode_condition(_latents(2, seed=1)), ring.encode_condition(_latents(2, seed=1))
        assert calls == [((2, 4, 4), (2, 4, 4))] * depth
        calls.clear()
        out = ring(_latents(1, seed=2), t, text, cond_cache=cache_r)
        assert calls == []  # one noisy frame: dense, as single-process
        # fp32 with weights of std 0.3: the dense ring and SDPA sum in different orders (~3e-5)
        torch.testing.assert_close(out, single(_latents(1, seed=2), t, text, cond_cache=cache_s), rtol=1e-4, atol=1e-4)
        out = ring(_latents(3, seed=2), t, text, num_cond_latents=1)
        assert calls == [((1, 4, 4), (1, 4, 4)), ((2, 4, 4), (3, 4, 4))] * depth
        torch.testing.assert_close(out, single(_latents(3, seed=2), t, text, num_cond_latents=1), rtol=1e-4, atol=1e-4)
