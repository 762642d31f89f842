"""Triton forward and backward of block attention over selected key blocks.

Imported lazily (only when the Triton backend is used), so ``import kernels.bsa`` never imports triton.
To run the kernels on CPU tensors set ``TRITON_INTERPRET=1`` before triton is first imported in the process
(triton decorates its own ``tl.max``/``tl.sum`` helpers at import time, reading the variable then).

Layout: ``qb/kb/vb/out [B, n, bs, H, D]`` (contiguous), ``lse/delta [B, H, nq, bs]`` fp32,
``kv_index [B, H, nq, K] int32``, ``kv_count [B, H, nq] int32``, ``q_valid/k_valid [n, bs] uint8``.

* forward: one program per (query block, batch*head); online softmax over the listed key blocks only;
  fp32 accumulators; lse in natural log.
* backward: ``delta = rowsum(dout * out) - dlse`` (so a gradient w.r.t. lse is supported), then
  - dq: one program per (query block, batch*head), iterating over its listed key blocks;
  - dk/dv: one program per (batch*head, key block), iterating over the query blocks that listed it. That
    reverse map is built with a stable argsort of the selected (head, key block) ids plus a bincount,
    O(B*H*nq*K) memory; no dense [nq, nk] mask is ever built. Programs are launched head by head, busiest
    key blocks first (:func:`busiest_first`), so a key block chosen by most query blocks does not become
    the launch's tail.
  Scores are always recomputed as fp32 ``dot(q, k) * scale`` (never by pre-scaling K in the input dtype).

Rows with no key (``kv_count == 0`` or padded query slots) give out = 0, lse = -inf and zero gradients.
Key block ids within the first ``kv_count`` slots must be distinct (selection guarantees it).

Tiles, dot precision and launch options come from ``launch_space`` (autotuned on a GPU, fixed under the
interpreter); every configuration there is compiled for sm_80 and sm_90 by tests/kernels/test_compile_targets.py.
Known limits: run on a GPU only through bench/gpu_check.sh so far; fp32 is an exact correctness path that
spills registers on a GPU (see launch_space). The dk/dv load imbalance (a key block chosen by up to 15x
the mean number of query blocks on smooth fields) is measured by bench/bsa_balance.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_space import ARCHS, DTYPES, dot_precision, launch_options, target_arch, tile_shape

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _bsa_fwd_kernel(Q, K, V, O, LSE, QVALID, KVALID, IDX, CNT, qk_scale,
                    s_qb, s_qn, s_qt, s_qh, s_kb, s_kn, s_kt, s_kh, s_vb, s_vn, s_vt, s_vh,
                    s_ob, s_on, s_ot, s_oh,
                    H, NQ, MAXK, BS, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    qblk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < BS
    md_in = m_in[:, None] & (offs_d < D)[None, :]
    qval = tl.load(QVALID + qblk * BS + offs_m, mask=m_in, other=0) != 0
    q = tl.load(Q + b * s_qb + qblk * s_qn + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                mask=md_in, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = bh * NQ + qblk
    cnt = tl.load(CNT + row)
    for j in range(0, cnt):
        kblk = tl.load(IDX + row * MAXK + j).to(tl.int64)
        k = tl.load(K + b * s_kb + kblk * s_kn + h * s_kh + offs_m[:, None] * s_kt + offs_d[None, :],
                    mask=md_in, other=0.0)
        v = tl.load(V + b * s_vb + kblk * s_vn + h * s_vh + offs_m[:, None] * s_vt + offs_d[None, :],
                    mask=md_in, other=0.0)
        kval = tl.load(KVALID + kblk * BS + offs_m, mask=m_in, other=0) != 0
        # fp32 scores in log2 units: dot accumulates in fp32, the scale is applied in fp32.
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(qval[:, None] & kval[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * s_ob + qblk * s_on + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=md_in)
    tl.store(LSE + row * BS + offs_m, lse, mask=m_in)


@triton.jit
def _bsa_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, QVALID, KVALID, IDX, CNT, sm_scale,
                       s_qb, s_qn, s_qt, s_qh, s_kb, s_kn, s_kt, s_kh, s_vb, s_vn, s_vt, s_vh,
                       H, NQ, MAXK, BS, D,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    # Q, DO and DQ share one layout (all contiguous [B, nq, bs, H, D]); so do K and V strides' meaning.
    qblk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < BS
    md_in = m_in[:, None] & (offs_d < D)[None, :]
    row = bh * NQ + qblk
    qval = tl.load(QVALID + qblk * BS + offs_m, mask=m_in, other=0) != 0
    q_off = b * s_qb + qblk * s_qn + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=md_in, other=0.0)
    do = tl.load(DO + q_off, mask=md_in, other=0.0)
    lse = tl.load(LSE + row * BS + offs_m, mask=m_in, other=float("-inf"))
    delta = tl.load(DELTA + row * BS + offs_m, mask=m_in, other=0.0)
    # Empty rows (lse = -inf): use +inf so that p = exp(s - lse) = 0 rather than NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cnt = tl.load(CNT + row)
    for j in range(0, cnt):
        kblk = tl.load(IDX + row * MAXK + j).to(tl.int64)
        k = tl.load(K + b * s_kb + kblk * s_kn + h * s_kh + offs_m[:, None] * s_kt + offs_d[None, :],
                    mask=md_in, other=0.0)
        v = tl.load(V + b * s_vb + kblk * s_vn + h * s_vh + offs_m[:, None] * s_vt + offs_d[None, :],
                    mask=md_in, other=0.0)
        kval = tl.load(KVALID + kblk * BS + offs_m, mask=m_in, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        s = tl.where(qval[:, None] & kval[None, :], s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=md_in)


@triton.jit
def _bsa_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QVALID, KVALID, QIDS, QOFF, QCNT, ORDER, sm_scale,
                         s_qb, s_qn, s_qt, s_qh, s_kb, s_kn, s_kt, s_kh, s_vb, s_vn, s_vt, s_vh,
                         H, NQ, NK, BS, D,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    # Q and DO share strides; K and DK share strides; V and DV share strides.
    # Program i handles slot ORDER[i] = bh * NK + key block (heads in turn, the busiest key blocks first).
    slot = tl.load(ORDER + tl.program_id(0)).to(tl.int64)
    kblk = slot % NK
    bh = slot // NK
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < BS
    md_in = m_in[:, None] & (offs_d < D)[None, :]
    k_off = b * s_kb + kblk * s_kn + h * s_kh + offs_m[:, None] * s_kt + offs_d[None, :]
    v_off = b * s_vb + kblk * s_vn + h * s_vh + offs_m[:, None] * s_vt + offs_d[None, :]
    k = tl.load(K + k_off, mask=md_in, other=0.0)
    v = tl.load(V + v_off, mask=md_in, other=0.0)
    kval = tl.load(KVALID + kblk * BS + offs_m, mask=m_in, other=0) != 0
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = tl.load(QOFF + slot).to(tl.int64)
    n = tl.load(QCNT + slot)
    for i in range(0, n):
        qblk = tl.load(QIDS + start + i).to(tl.int64)
        row = bh * NQ + qblk
        q_off = b * s_qb + qblk * s_qn + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :]
        q = tl.load(Q + q_off, mask=md_in, other=0.0)
        do = tl.load(DO + q_off, mask=md_in, other=0.0)
        qval = tl.load(QVALID + qblk * BS + offs_m, mask=m_in, other=0) != 0
        lse = tl.load(LSE + row * BS + offs_m, mask=m_in, other=float("-inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + row * BS + offs_m, mask=m_in, other=0.0)
        # Transposed scores [keys, queries], fp32.
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * sm_scale
        st = tl.where(kval[:, None] & qval[None, :], st, float("-inf"))
        pt = tl.exp(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    tl.store(DK + k_off, dk.to(DK.dtype.element_ty), mask=md_in)
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=md_in)


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _meta(x: torch.Tensor) -> dict:
    """Compile-time constants of a launch for blocked tensors like ``x``: tiles and dot precision."""
    B, n, bs, H, D = x.shape
    block_m, block_d = tile_shape(bs, D, interpret=INTERPRET)
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "PREC": dot_precision(_dtype_name(x))}


def _strides(x: torch.Tensor):
    assert x.stride(-1) == 1
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


# Argument lists of the three kernels, in their signature order. The launches below and the compile check
# (kernels/bsa/compile_check.py, which calls these on meta tensors of the published shapes) share them.

def fwd_args(qb, kb, vb, out, lse, qv, kvl, kv_index, kv_count, scale):
    B, nq, bs, H, D = qb.shape
    return (qb, kb, vb, out, lse, qv, kvl, kv_index, kv_count, scale * LOG2E,
            *_strides(qb), *_strides(kb), *_strides(vb), *_strides(out), H, nq, kv_index.shape[-1], bs, D)


def dq_args(qb, kb, vb, dout, dq, lse, delta, qv, kvl, kv_index, kv_count, scale):
    B, nq, bs, H, D = qb.shape
    return (qb, kb, vb, dout, dq, lse, delta, qv, kvl, kv_index, kv_count, scale,
            *_strides(qb), *_strides(kb), *_strides(vb), H, nq, kv_index.shape[-1], bs, D)


def dkdv_args(qb, kb, vb, dout, dk, dv, lse, delta, qv, kvl, q_ids, q_off, q_cnt, order, scale):
    B, nq, bs, H, D = qb.shape
    return (qb, kb, vb, dout, dk, dv, lse, delta, qv, kvl, q_ids, q_off, q_cnt, order, scale,
            *_strides(qb), *_strides(kb), *_strides(vb), H, nq, kb.shape[1], bs, D)


KERNELS = {"fwd": _bsa_fwd_kernel, "bwd_dq": _bsa_bwd_dq_kernel, "bwd_dkdv": _bsa_bwd_dkdv_kernel}


def _autotuned(name: str, kernel):
    """On a GPU: ``kernel`` autotuned on its first call per dtype and tile, over launch_space's options for
    this kernel, that dtype and the device's target (the others are pruned before benchmarking)."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        allowed = set(launch_options(name, _dtype_name(q), target_arch(10 * major + minor)))
        return [c for c in configs if (c.num_warps, c.num_stages) in allowed]

    options = sorted({o for arch in ARCHS for dtype in DTYPES for o in launch_options(name, dtype, arch)})
    return triton.autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in options],
                           key=["BLOCK_M", "BLOCK_D", "PREC"], prune_configs_by={"early_config_prune": prune})(kernel)


INTERPRET = not isinstance(_bsa_fwd_kernel, triton.runtime.JITFunction)
_TUNED = {} if INTERPRET else {name: _autotuned(name, k) for name, k in KERNELS.items()}


def _launch(name: str, grid, args, meta: dict, dtype: str) -> None:
    """Autotuned launch on a GPU; the first launch_space option under the interpreter (nothing tuned)."""
    if INTERPRET:
        warps, stages = launch_options(name, dtype, ARCHS[-1])[0]
        KERNELS[name][grid](*args, **meta, num_warps=warps, num_stages=stages)
    else:
        _TUNED[name][grid](*args, **meta)


def autotuned_choices() -> dict:
    """What the autotuner picked so far in this process: ``{kernel: {tuning key: (num_warps, num_stages)}}``."""
    return {name: {key: (cfg.num_warps, cfg.num_stages) for key, cfg in tuned.cache.items()}
            for name, tuned in _TUNED.items()}


def busiest_first(counts: torch.Tensor, nk: int) -> torch.Tensor:
    """Launch order of the dk/dv programs: one head after another, the heads ordered by their busiest key
    block and each head's key blocks by decreasing number of query blocks (stable sorts, descending).
    ``counts [B*H*nk]`` -> program order ``[B*H*nk]`` int32 (slot ids ``bh * nk + key block``).

    A key block chosen by many query blocks is one long program; started last it finishes last. Busiest
    first removes most of that tail (bench/bsa_balance.py measures it) while the programs running together
    still share one head's Q and dO in L2, which a global longest-first order would give up.
    """
    per_head = counts.view(-1, nk)
    heads = torch.argsort(per_head.max(dim=1).values, descending=True, stable=True)
    within = torch.argsort(per_head[heads], dim=1, descending=True, stable=True)
    return (within + heads.view(-1, 1) * nk).reshape(-1).to(torch.int32).contiguous()


def build_reverse_map(kv_index: torch.Tensor, kv_count: torch.Tensor, nk: int):
    """Key block -> query blocks that selected it, per (batch, head), without a dense [nq, nk] mask.

    Returns ``(q_ids [N] int32, offsets [B*H*nk] int32, counts [B*H*nk] int32)``: the query blocks of key
    block ``j`` of head ``bh`` are ``q_ids[offsets[bh*nk + j] : offsets[...] + counts[...]]``.
    """
    B, H, nq, K = kv_index.shape
    used = torch.arange(K, device=kv_index.device) < kv_count[..., None].long()
    bh = torch.arange(B * H, device=kv_index.device).view(B, H, 1, 1)
    key = (bh * nk + kv_index.long())[used]
    qid = torch.arange(nq, device=kv_index.device).view(1, 1, nq, 1).expand(B, H, nq, K)[used]
    order = torch.argsort(key, stable=True)
    q_ids = qid[order].to(torch.int32).contiguous()
    counts = torch.bincount(key, minlength=B * H * nk)
    offsets = torch.cumsum(counts, 0) - counts
    return q_ids, offsets.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


class BlockAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale):
        qb, kb, vb = qb.contiguous(), kb.contiguous(), vb.contiguous()
        B, nq, bs, H, D = qb.shape
        qv = q_valid.to(torch.uint8).contiguous()
        kvl = k_valid.to(torch.uint8).contiguous()
        kv_index = kv_index.to(torch.int32).contiguous()
        kv_count = kv_count.to(torch.int32).contiguous()
        out = torch.empty_like(qb)
        lse = torch.empty(B, H, nq, bs, dtype=torch.float32, device=qb.device)
        _launch("fwd", (nq, B * H), fwd_args(qb, kb, vb, out, lse, qv, kvl, kv_index, kv_count, scale),
                _meta(qb), _dtype_name(qb))
        ctx.save_for_backward(qb, kb, vb, qv, kvl, kv_index, kv_count, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qb, kb, vb, qv, kvl, kv_index, kv_count, out, lse = ctx.saved_tensors
        scale = ctx.scale
        B, nq, bs, H, D = qb.shape
        nk = kb.shape[1]
        dout = dout.to(qb.dtype).contiguous()
        delta = (dout.float() * out.float()).sum(-1).permute(0, 3, 1, 2)  # [B, H, nq, bs]
        if dlse is not None:
            # lse = -inf (empty row) is constant: ignore its incoming gradient (may be NaN from a merge).
            delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(lse))
        delta = delta.contiguous()
        meta, dtype = _meta(qb), _dtype_name(qb)
        dq = torch.empty_like(qb)
        _launch("bwd_dq", (nq, B * H), dq_args(qb, kb, vb, dout, dq, lse, delta, qv, kvl, kv_index, kv_count, scale),
                meta, dtype)
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return dq, None, None, None, None, None, None, None
        q_ids, q_off, q_cnt = build_reverse_map(kv_index, kv_count, nk)
        if q_ids.numel() == 0:  # keep a valid pointer for the kernel
            q_ids = torch.zeros(1, dtype=torch.int32, device=qb.device)
        dk = torch.empty_like(kb)
        dv = torch.empty_like(vb)
        _launch("bwd_dkdv", (B * H * nk,),
                dkdv_args(qb, kb, vb, dout, dk, dv, lse, delta, qv, kvl, q_ids, q_off, q_cnt,
                          busiest_first(q_cnt, nk), scale), meta, dtype)
        return dq, dk, dv, None, None, None, None, None


def block_attention_triton(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, scale):
    """Triton block attention; see :func:`kernels.bsa.block_attention` for the contract."""
    return BlockAttentionTriton.apply(qb, kb, vb, q_valid, k_valid, kv_index, kv_count, float(scale))
