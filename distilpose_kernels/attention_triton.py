"""Triton kernels for token attention and the fused "add position + LayerNorm" step.

Imported only when a Triton path runs (never by ``import distilpose_kernels``). Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on the CPU.

Layout conventions (N batch, L tokens, H heads, D head dim, C = H * D):
- ``qkv``  (N, L, 3C): packed [q | k | v], head h in columns h*D:(h+1)*D of each third;
  read through its strides (no rearrange or padding copies).
- ``out``  (N, L, C): heads merged, written directly in that layout.
- ``lse``  (N, H, L) float32: natural-log log-sum-exp of each row of the scaled scores.
- ``dqkv`` (N, L, 3C): dq | dk | dv packed like ``qkv``, every element written exactly once.

Head dims that are not a power of two (16 <= BLOCK_D) are handled by masking the
head-dim lanes inside the kernel; L of any size by masking the last token block.
All matmuls accumulate in float32; float32 operands get fp32-accurate dots
(``_utils.fp32_dot_precision``: 3xTF32 tensor-core products on sm_80+, FMA elsewhere).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_helpers import dot as _dot
from ._triton_helpers import last_to_arrive, layernorm_rows, pdl_enter, split_bounds
from ._utils import (cdiv, contiguous_vectors, env_switch, fp32_dot_precision, next_pow2, pdl_launch, triton_interpret,
                     zeroed_counts)

_LOG2E = 1.4426950408889634

_INTERPRET = triton_interpret()
#: Set DISTILPOSE_ATTN_AUTOTUNE=0 to use the fixed heuristic block sizes on GPU too.
#: (Tests flip ``AUTOTUNE`` at run time; the autotuners exist whenever the kernels are compiled.)
AUTOTUNE = (not _INTERPRET) and env_switch("DISTILPOSE_ATTN_AUTOTUNE", True)


def _new_output(shape, device, dtype) -> torch.Tensor:
    """Allocate an output buffer the kernels fully overwrite (tests swap this to NaN-fill)."""
    return torch.empty(shape, device=device, dtype=dtype)


# ============================================================================ attention forward



@triton.jit
def _online_softmax_step(q, k, v, n_ok, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax (log2 units): folds softmax(q k^T * scale) v over the
    keys ``n_ok`` into the running max ``m_i``, sum ``l_i`` and accumulator ``acc``."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    QKV, Out, LSE, WS, WML, CNT,
    stride_qn, stride_ql, stride_qc,
    stride_on, stride_ol, stride_oc,
    L, H, C, qk_scale,  # qk_scale = softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per (query block, sequence x head); online softmax over the keys.

    SPLIT > 1 (split keys, for launches too small to fill the GPU: batch-1 inference): the keys
    are cut in SPLIT slices (program_id(2)); each program stores its unnormalised accumulator to
    WS (SPLIT, N*H, L, BLOCK_D) and its running max and sum (log2 units) to WML (SPLIT, N*H, L, 2),
    then counts itself in CNT[(sequence x head, query block)] (zero before the launch); the last
    one merges the slices in slice order (the same result whichever came last), stores the
    output and the log-sum-exp, and resets the count.
    """
    pdl_enter(USE_PDL)
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < L
    col = h * HEAD_DIM + offs_d  # column of this head inside q (k and v: + C, + 2C)

    base = QKV + n * stride_qn
    q = tl.load(base + offs_m[:, None] * stride_ql + col[None, :] * stride_qc,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = base + (C + col)[None, :] * stride_qc
    v_base = base + (2 * C + col)[None, :] * stride_qc

    lo, hi = split_bounds(L, SPLIT, BLOCK_N, tl.program_id(2))  # SPLIT == 1: all keys
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ql, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_ql, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_ok, m_i, l_i, acc, qk_scale, PRECISION, UPCAST)

    out_ptrs = Out + n * stride_on + offs_m[:, None] * stride_ol + col[None, :] * stride_oc
    if SPLIT == 1:
        acc = acc / l_i[:, None]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + pid_nh.to(tl.int64) * L + offs_m, lse, mask=m_ok)
    else:
        nh_total = tl.num_programs(1)
        row = (tl.program_id(2) * nh_total + pid_nh).to(tl.int64) * L + offs_m  # (slice, nh, query)
        tl.store(WS + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_ok[:, None])
        tl.store(WML + row * 2, m_i, mask=m_ok)
        tl.store(WML + row * 2 + 1, l_i, mask=m_ok)
        cnt = CNT + pid_nh * tl.num_programs(0) + pid_m
        if last_to_arrive(cnt, SPLIT):
            m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for sl in tl.static_range(SPLIT):
                r = (sl * nh_total + pid_nh).to(tl.int64) * L + offs_m
                m_all = tl.maximum(m_all, tl.load(WML + r * 2, mask=m_ok, other=float("-inf"), cache_modifier=".cg"))
            m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # rows past L
            l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for sl in tl.static_range(SPLIT):
                r = (sl * nh_total + pid_nh).to(tl.int64) * L + offs_m
                w = tl.exp2(tl.load(WML + r * 2, mask=m_ok, other=float("-inf"), cache_modifier=".cg") - m_safe)
                l_all += w * tl.load(WML + r * 2 + 1, mask=m_ok, other=0.0, cache_modifier=".cg")
                acc += w[:, None] * tl.load(WS + r[:, None] * BLOCK_D + offs_d[None, :], mask=m_ok[:, None],
                                            other=0.0, cache_modifier=".cg")
            l_all = tl.where(m_ok, l_all, 1.0)  # rows past L: nothing summed, nothing stored
            acc = acc / l_all[:, None]
            tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
            lse = (m_all + tl.log2(l_all)) * 0.6931471805599453
            tl.store(LSE + pid_nh.to(tl.int64) * L + offs_m, lse, mask=m_ok)
            tl.store(cnt, 0)


# ============================================================================ qkv projection + attention (inference)


@triton.jit
def _xw_tile(X, Wt, rows, r_ok, w_rows, w_ok, C, sxl, sxc, swo, swc, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """(ROWS, BLOCK_D) fp32 tile of X[rows] @ Wt[w_rows]^T over the C input columns (zero in
    masked rows / columns)."""
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        x = tl.load(X + rows[:, None] * sxl + cc[None, :] * sxc, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(Wt + w_rows[None, :] * swo + cc[:, None] * swc, mask=c_ok[:, None] & w_ok[None, :], other=0.0)
        acc += _dot(x, w, PRECISION, UPCAST)
    return acc


@triton.jit
def _xw2_tile(X, Wt, rows, r_ok, w_rows, w_ok, C, sxl, sxc, swo, swc, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """The k and v tiles of a key block: X[rows] @ Wt[C + w_rows]^T and X[rows] @ Wt[2C + w_rows]^T,
    (ROWS, BLOCK_D) fp32 each, in one pass over the C input columns (each x chunk loaded once
    for both: half the loop trips, whose load latency the batch-1 launch cannot hide)."""
    offs_c = tl.arange(0, BLOCK_C)
    k = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    v = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    wk_rows = C + w_rows
    wv_rows = 2 * C + w_rows
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        x = tl.load(X + rows[:, None] * sxl + cc[None, :] * sxc, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        w_mask = c_ok[:, None] & w_ok[None, :]
        wk = tl.load(Wt + wk_rows[None, :] * swo + cc[:, None] * swc, mask=w_mask, other=0.0)
        wv = tl.load(Wt + wv_rows[None, :] * swo + cc[:, None] * swc, mask=w_mask, other=0.0)
        k += _dot(x, wk, PRECISION, UPCAST)
        v += _dot(x, wv, PRECISION, UPCAST)
    return k, v


@triton.jit
def _qkv_attn_fwd_kernel(
    X, Wt, Bias, Out,
    stride_xn, stride_xl, stride_xc,
    stride_wo, stride_wc,
    stride_on, stride_ol, stride_oc,
    L, H, C, NH, qk_scale,  # NH = N * H (the grid's second axis: in the autotuner's key); qk_scale = scale * log2(e)
    HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """token_attention(x @ Wt^T + bias) without the (N, L, 3C) qkv tensor: one program per
    (query block, sequence x head) makes its head's q for its query rows, then, key block by
    key block, that block's k and v (from x and the head's rows of Wt) and folds them into an
    online softmax. k and v are recomputed by each query block of the head: a batch-1 trade of
    FLOPs (cheap on the tensor cores) for one launch and one (N, L, 3C) round trip less.
    q, k and v are rounded to x's dtype before the attention products, as the two-op path
    stores them."""
    pdl_enter(USE_PDL)
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < L
    w_q = h * HEAD_DIM + offs_d  # this head's rows of Wt (k: + C, v: + 2C)
    xb = X + n * stride_xn
    q = _xw_tile(xb, Wt, offs_m, m_ok, w_q, d_ok, C, stride_xl, stride_xc, stride_wo, stride_wc, PRECISION, UPCAST,
                 BLOCK_M, BLOCK_D, BLOCK_C)
    if HAS_BIAS:
        q += tl.load(Bias + w_q, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    q = q.to(X.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < L
        k, v = _xw2_tile(xb, Wt, cols, n_ok, w_q, d_ok, C, stride_xl, stride_xc, stride_wo, stride_wc, PRECISION,
                         UPCAST, BLOCK_N, BLOCK_D, BLOCK_C)
        if HAS_BIAS:
            k += tl.load(Bias + C + w_q, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            v += tl.load(Bias + 2 * C + w_q, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        k = k.to(X.dtype.element_ty)
        v = v.to(X.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_ok, m_i, l_i, acc, qk_scale, PRECISION, UPCAST)
    acc = acc / l_i[:, None]
    col = h * HEAD_DIM + offs_d
    out_ptrs = Out + n * stride_on + offs_m[:, None] * stride_ol + col[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


#: (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages) of the fused qkv + attention forward. Small query
#: blocks give more programs (batch 1 with the flip test: 2 x 8 heads) at the price of more k / v
#: recomputation per head; the GPU autotuner times them per (L, C, N * H, head dim, dtype). With
#: two stages every fp32 candidate with 3xTF32 or FMA dots spilled for sm_90 (255 registers and a
#: 24-664 byte stack frame), so fp32-accurate dots get the one-stage tiles only (the prune below);
#: 16-bit operands (and plain TF32) may also take the two-stage ones. None of the candidates a
#: precision keeps spills (tests/test_qkv_attention.py).
QKV_ATTN_CONFIGS = ((16, 32, 32, 4, 1), (32, 32, 32, 4, 1), (32, 32, 16, 4, 1), (64, 32, 32, 8, 1),
                    (16, 64, 32, 4, 1), (32, 16, 32, 4, 1), (64, 64, 32, 8, 1),
                    (64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (16, 64, 64, 4, 2))
#: the heuristic config (interpreter, autotuning off)
QKV_ATTN_DEFAULT = (32, 32, 32, 4, 1)
#: tests set this to one of QKV_ATTN_CONFIGS to run it
QKV_ATTN_OVERRIDE: Optional[tuple] = None


def qkv_attn_config_ok(cfg: tuple, precision: str) -> bool:
    """Whether the autotuner times ``cfg`` (a QKV_ATTN_CONFIGS entry) for dots of ``precision``."""
    return cfg[4] == 1 or precision not in ("tf32x3", "ieee")


def _qkv_attn_prune(configs, named_args, **kwargs):
    cap = _pow2_at_least(named_args["L"], 16)
    precision = kwargs.get("PRECISION", named_args.get("PRECISION"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, cap) and c.kwargs["BLOCK_N"] <= max(32, cap)
            and qkv_attn_config_ok((0, 0, 0, 0, c.num_stages), precision)]
    return kept or configs[:1]


_QKV_ATTN_TUNED = (
    triton.autotune([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
                     for bm, bn, bc, w, s in QKV_ATTN_CONFIGS],
                    key=["L", "C", "NH", "HEAD_DIM", "BLOCK_D", "HAS_BIAS", "PRECISION", "UPCAST"],
                    prune_configs_by={"early_config_prune": _qkv_attn_prune})(_qkv_attn_fwd_kernel)
    if not _INTERPRET else None
)


def qkv_attention_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                          scale: float) -> torch.Tensor:
    """x (N, L, C) any strides, weight (3C, C) any strides, bias (3C,) or None -> (N, L, C) in
    x's dtype: token_attention(x @ weight^T + bias, num_heads, scale) without the qkv tensor."""
    n, L, c = x.shape
    out = _new_output((n, L, c), x.device, x.dtype)
    if n == 0 or L == 0 or c == 0:
        return out
    (bias,) = contiguous_vectors(bias)
    per_batch_chunk(_qkv_attention_into, (x, out), num_heads, scale, weight, bias)
    return out


def _qkv_attention_into(x: torch.Tensor, out: torch.Tensor, num_heads: int, scale: float, weight: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> None:
    n, L, c = x.shape
    d = c // num_heads
    block_d = _pow2_at_least(d, 16)
    precision = _precision(x.dtype, x.device)
    nh = n * num_heads
    args = (x, weight, bias if bias is not None else weight, out, *x.stride(), *weight.stride(), *out.stride(),
            L, num_heads, c, nh, scale * _LOG2E)
    meta = dict(HAS_BIAS=bias is not None, HEAD_DIM=d, BLOCK_D=block_d, PRECISION=precision,
                UPCAST=_upcast(x.dtype), **pdl_launch(x.device))
    if QKV_ATTN_OVERRIDE is None and AUTOTUNE and _QKV_ATTN_TUNED is not None:
        _QKV_ATTN_TUNED[lambda m: (cdiv(L, m["BLOCK_M"]), nh)](*args, **meta)
        return
    bm, bn, bc, warps, stages = QKV_ATTN_OVERRIDE or QKV_ATTN_DEFAULT
    _qkv_attn_fwd_kernel[(cdiv(L, bm), nh)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps,
                                            num_stages=stages)


# ============================================================================ attention backward


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO, DLSE, Delta,
    stride_on, stride_ol, stride_oc,
    stride_dn, stride_dl, stride_dc,
    L, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """Delta[n, h, l] = sum_d dO * O  (minus dLSE when the lse output has a gradient)."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    col = h * HEAD_DIM + offs_d
    o = tl.load(Out + n * stride_on + offs_m[:, None] * stride_ol + col[None, :] * stride_oc, mask=mask, other=0.0)
    do = tl.load(DO + n * stride_dn + offs_m[:, None] * stride_dl + col[None, :] * stride_dc, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_nh.to(tl.int64) * L + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=m_ok, other=0.0).to(tl.float32)
    tl.store(Delta + row, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, LSE, Delta, DQKV,
    stride_qn, stride_ql, stride_qc,
    stride_dn, stride_dl, stride_dc,
    stride_gn, stride_gl, stride_gc,
    L, H, C, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (key block, n, h): loops over query blocks, writes dk and dv."""
    pid_n = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < L
    col = h * HEAD_DIM + offs_d
    kv_mask = n_ok[:, None] & d_ok[None, :]

    base = QKV + n * stride_qn
    k = tl.load(base + offs_n[:, None] * stride_ql + (C + col)[None, :] * stride_qc, mask=kv_mask, other=0.0)
    v = tl.load(base + offs_n[:, None] * stride_ql + (2 * C + col)[None, :] * stride_qc, mask=kv_mask, other=0.0)
    q_base = base + col[None, :] * stride_qc
    do_base = DO + n * stride_dn + col[None, :] * stride_dc
    row_base = pid_nh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < L
        mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql, mask=mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dl, mask=mask, other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
        # transposed scores: (BLOCK_N keys, BLOCK_M queries)
        s_t = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where(m_ok[None, :], p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)

    dk *= sm_scale
    g_base = DQKV + n * stride_gn + offs_n[:, None] * stride_gl
    tl.store(g_base + (C + col)[None, :] * stride_gc, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(g_base + (2 * C + col)[None, :] * stride_gc, dv.to(DQKV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, Delta, DQKV,
    stride_qn, stride_ql, stride_qc,
    stride_dn, stride_dl, stride_dc,
    stride_gn, stride_gl, stride_gc,
    L, H, C, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query block, n, h): loops over key blocks, writes dq."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < L
    col = h * HEAD_DIM + offs_d
    mask = m_ok[:, None] & d_ok[None, :]

    base = QKV + n * stride_qn
    q = tl.load(base + offs_m[:, None] * stride_ql + col[None, :] * stride_qc, mask=mask, other=0.0)
    do = tl.load(DO + n * stride_dn + offs_m[:, None] * stride_dl + col[None, :] * stride_dc, mask=mask, other=0.0)
    row = pid_nh.to(tl.int64) * L + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    k_base = base + (C + col)[None, :] * stride_qc
    v_base = base + (2 * C + col)[None, :] * stride_qc

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ql, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_ql, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    dq *= sm_scale
    tl.store(DQKV + n * stride_gn + offs_m[:, None] * stride_gl + col[None, :] * stride_gc,
             dq.to(DQKV.dtype.element_ty), mask=mask)


# ============================================================================ launch configuration


@functools.lru_cache(maxsize=1024)
def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, next_pow2(x))


@functools.lru_cache(maxsize=1024)
def _heuristic_blocks(L: int, block_d: int, dtype: torch.dtype) -> Tuple[int, int]:
    """Fixed (BLOCK_M, BLOCK_N) used in the interpreter and when autotuning is off."""
    blk = min(64, _pow2_at_least(L, 16))
    bn = blk
    if block_d >= 256:
        blk = bn = min(blk, 32)  # keeps fp32 tiles inside shared memory
    elif block_d >= 128 and dtype == torch.float32:
        bn = min(bn, 32)
    return blk, bn


#: Tests may set this to (BLOCK_M, BLOCK_N) to force small blocks (several blocks at small L), or
#: to one of ``_configs()`` (a triton.Config) to check that config's compiled code.
BLOCK_OVERRIDE: Optional[object] = None


def _configs(split: bool = False):
    """Autotune candidates (BLOCK_M, BLOCK_N, warps, stages); ``split``: with SPLIT set, plus the
    split-key forward configs."""
    cfgs = []
    for bm, bn, w, s in [
        (32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
        (128, 32, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (32, 64, 4, 2),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"SPLIT": 1} if split else {})}, num_warps=w,
                                  num_stages=s))
    if split:
        cfgs += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": sp}, num_warps=w, num_stages=s)
                 for bm, bn, w, s, sp in SPLIT_CONFIGS]
    return cfgs


#: split-key forward configs (BLOCK_M, BLOCK_N, warps, stages, SPLIT), timed for launches of at
#: most SPLIT_MAX_ROWS query rows (N * H * L). At batch 1 with the flip test (2 x 8 heads x 273
#: tokens) the plain forward has 80-144 programs, each walking all 273 keys; these cut the walk in
#: 2-4 slices on 2-4x the programs. (16, 128) without a split: 288 programs of 3 key steps each
#: (the H200 tuner's pick among the others, 64 x 64, walks 5; 32 x 128 spilled 7 KB in fp32).
SPLIT_CONFIGS = ((32, 32, 4, 2, 2), (32, 32, 4, 2, 3), (16, 32, 4, 2, 4), (16, 128, 4, 2, 1))
SPLIT_MAX_ROWS = 16384


def _prune(configs, named_args, **kwargs):
    # No point in blocks much larger than the sequence (L=17 needs no 128-row tiles).
    L = named_args["L"]
    cap = _pow2_at_least(L, 16)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, cap) and c.kwargs["BLOCK_N"] <= max(32, cap)]
    return kept or configs[:1]


#: autotuned config per (kernel, pow2 bucket of L, BLOCK_D, dtype, HEAD_DIM, PRECISION)
_BUCKET_CONFIGS: dict = {}
_KEY = ["L", "HEAD_DIM", "BLOCK_D", "PRECISION", "UPCAST"]
_RAW = {"fwd": _attn_fwd_kernel, "fwd_small": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel,
        "dq": _attn_bwd_dq_kernel}
#: which block size tiles the grid's first axis
_GRID_BLOCK = {"fwd": "BLOCK_M", "fwd_small": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}
_TUNED = (
    {k: triton.autotune(_configs(split=k == "fwd_small"), key=_KEY,
                        prune_configs_by={"early_config_prune": _prune})(f)
     for k, f in _RAW.items()}
    if not _INTERPRET else {}
)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 inputs: fp32-accurate dots (``_utils.fp32_dot_precision``); 16-bit inputs: the tensor cores.
    return fp32_dot_precision(device) if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _bucket(which: str, L: int, block_d: int, dtype: torch.dtype, head_dim, precision) -> tuple:
    """The key of an autotuned config in ``_BUCKET_CONFIGS`` (the power-of-two bucket of L)."""
    return (which, _pow2_at_least(L, 16), block_d, dtype, head_dim, precision)


def _launch(which: str, L: int, nh: int, block_d: int, dtype: torch.dtype, *args, **kw) -> None:
    """Launch an attention kernel: autotuned on GPU, fixed heuristic blocks otherwise. The
    forward kernels ("fwd", "fwd_small": with the split-key configs) take SPLIT (a third grid
    axis); BLOCK_OVERRIDE may set it (a Config's "SPLIT", or a third tuple entry)."""
    gb = _GRID_BLOCK[which]
    forward = which.startswith("fwd")
    if forward:
        kw.update(pdl_launch(args[0].device))
    cfg = BLOCK_OVERRIDE if isinstance(BLOCK_OVERRIDE, triton.Config) else None
    if BLOCK_OVERRIDE is None and AUTOTUNE and which in _TUNED:
        if which == "fwd":
            kw["SPLIT"] = 1  # its configs leave SPLIT to the caller ("fwd_small"'s set it)
        # Triton's autotuner keys on the exact L: every new sequence length would re-benchmark
        # all configs. Tune once per power-of-two bucket of L and reuse that config.
        bucket = _bucket(which, L, block_d, dtype, kw.get("HEAD_DIM"), kw.get("PRECISION"))
        cfg = _BUCKET_CONFIGS.get(bucket)
        if cfg is None:
            tuner = _TUNED[which]
            tuner[lambda meta: (cdiv(L, meta[gb]), nh, meta.get("SPLIT", 1))](*args, **kw)
            best = getattr(tuner, "best_config", None)
            if best is not None:
                _BUCKET_CONFIGS[bucket] = best
            return
        kw.pop("SPLIT", None)
    split = 1
    if cfg is not None:
        bm, bn, warps, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages
        split = cfg.kwargs.get("SPLIT", 1)
    else:
        bm, bn, *rest = BLOCK_OVERRIDE if BLOCK_OVERRIDE is not None else _heuristic_blocks(L, block_d, dtype)
        split = rest[0] if rest else 1
        warps, stages = 4, None
    if not forward:
        split = 1  # the backward kernels have no key split
    grid = (cdiv(L, bm if gb == "BLOCK_M" else bn), nh, split)
    extra = {} if stages is None else {"num_stages": stages}
    if forward:
        extra["SPLIT"] = split
    _RAW[which][grid](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **extra, **kw)


def _split_workspace(which: str, L: int, nh: int, block_d: int, device: torch.device,
                     bucket: tuple) -> Optional[tuple]:
    """(acc (S, nh, L, BLOCK_D), max/sum (S, nh, L, 2), counters) for the split-key forward when
    it may run (``which`` "fwd_small" on the GPU tuner, or a split BLOCK_OVERRIDE), else None.
    Once ``bucket`` is tuned only its config counts: no workspace (nor a counters' fill) per
    call when a one-pass config won."""
    tuned = _BUCKET_CONFIGS.get(bucket)
    if isinstance(BLOCK_OVERRIDE, triton.Config):
        splits = [(BLOCK_OVERRIDE.kwargs["BLOCK_M"], BLOCK_OVERRIDE.kwargs.get("SPLIT", 1))]
    elif BLOCK_OVERRIDE is not None:
        splits = [(BLOCK_OVERRIDE[0], BLOCK_OVERRIDE[2] if len(BLOCK_OVERRIDE) > 2 else 1)]
    elif which == "fwd_small" and AUTOTUNE and which in _TUNED:
        splits = ([(tuned.kwargs["BLOCK_M"], tuned.kwargs.get("SPLIT", 1))] if tuned is not None
                  else [(bm, sp) for bm, _, _, _, sp in SPLIT_CONFIGS])
    else:
        return None
    splits = [(bm, sp) for bm, sp in splits if sp > 1]
    if not splits:
        return None
    s_max = max(sp for _, sp in splits)
    ws = torch.empty((s_max, nh, L, block_d), device=device, dtype=torch.float32)
    wml = torch.empty((s_max, nh, L, 2), device=device, dtype=torch.float32)
    return ws, wml, _new_counts(nh * cdiv(L, min(bm for bm, _ in splits)), device)


def _new_counts(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters of the split-key forward (``_utils.zeroed_counts``); tests swap in a
    shared buffer to check that the kernel leaves them at zero."""
    return zeroed_counts(n, device)


# ============================================================================ host wrappers


#: CUDA's limit on a grid's second axis, where the attention kernels put sequence x head
MAX_GRID_Y = 65535


def per_batch_chunk(launch, batched: tuple, num_heads: int, *rest) -> None:
    """``launch(*batched, num_heads, *rest)``, or, when N * num_heads exceeds ``MAX_GRID_Y``, once
    per slice of the batch (dim 0 of every tensor in ``batched``; None stays None) that fits."""
    n = batched[0].shape[0]
    if n * num_heads <= MAX_GRID_Y:
        launch(*batched, num_heads, *rest)
        return
    per = MAX_GRID_Y // num_heads
    if per < 1:
        raise ValueError(f"num_heads: {num_heads} heads exceed the {MAX_GRID_Y} programs a CUDA grid axis holds")
    for i in range(0, n, per):
        launch(*(None if t is None else t[i:i + per] for t in batched), num_heads, *rest)


def attention_forward(qkv: torch.Tensor, num_heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """qkv (N, L, 3C) -> (out (N, L, C) in qkv's dtype, lse (N, H, L) float32)."""
    n, L, three_c = qkv.shape
    c = three_c // 3
    out = _new_output((n, L, c), qkv.device, qkv.dtype)
    lse = _new_output((n, num_heads, L), qkv.device, torch.float32)
    if n == 0 or L == 0:
        return out, lse
    per_batch_chunk(_attention_forward_into, (qkv, out, lse), num_heads, scale)
    return out, lse


def _attention_forward_into(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                            scale: float) -> None:
    n, L, three_c = qkv.shape
    c = three_c // 3
    d = c // num_heads
    block_d = _pow2_at_least(d, 16)
    nh = n * num_heads
    which = "fwd_small" if nh * L <= SPLIT_MAX_ROWS else "fwd"
    precision = _precision(qkv.dtype, qkv.device)
    bucket = _bucket(which, L, block_d, qkv.dtype, d, precision)
    ws, wml, cnt = _split_workspace(which, L, nh, block_d, qkv.device, bucket) or (out, out, out)
    _launch(
        which, L, nh, block_d, qkv.dtype,
        qkv, out, lse, ws, wml, cnt,
        *qkv.stride(), *out.stride(),
        L, num_heads, c, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, PRECISION=precision, UPCAST=_upcast(qkv.dtype),
    )


def attention_backward(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """Gradient of (out, lse) w.r.t. qkv, packed like qkv: (N, L, 3C)."""
    n, L, three_c = qkv.shape
    dqkv = _new_output((n, L, three_c), qkv.device, qkv.dtype)
    if n == 0 or L == 0:
        return dqkv
    per_batch_chunk(_attention_backward_into, (dout, dlse, qkv, out, lse, dqkv), num_heads, scale)
    return dqkv


def _attention_backward_into(dout: torch.Tensor, dlse: Optional[torch.Tensor], qkv: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dqkv: torch.Tensor, num_heads: int, scale: float) -> None:
    n, L, three_c = qkv.shape
    c = three_c // 3
    d = c // num_heads
    block_d = _pow2_at_least(d, 16)
    nh = n * num_heads
    delta = _new_output((n, num_heads, L), qkv.device, torch.float32)
    bm_delta = min(64, _pow2_at_least(L, 16))
    _attn_bwd_delta_kernel[(cdiv(L, bm_delta), nh)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta,
        *out.stride(), *dout.stride(),
        L, num_heads,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm_delta, HAS_DLSE=dlse is not None,
    )
    common = (
        qkv, dout, lse, delta, dqkv,
        *qkv.stride(), *dout.stride(), *dqkv.stride(),
        L, num_heads, c, scale * _LOG2E, scale,
    )
    prec = _precision(qkv.dtype, qkv.device)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, PRECISION=prec, UPCAST=_upcast(qkv.dtype))
    _launch("dkdv", L, nh, block_d, qkv.dtype, *common, **meta)
    _launch("dq", L, nh, block_d, qkv.dtype, *common, **meta)


# ============================================================================ add position + LayerNorm


@triton.jit
def _apln_fwd_kernel(
    X, POS, W, B, XO, Y, Mean, Rstd, RES,
    stride_xn, stride_xl, stride_xc,
    stride_pp, stride_pc,
    stride_rn, stride_rl, stride_rc,
    R, L, C, P_START, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_POS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """BLOCK_R rows per program: x_out = x [+ residual] [+ pos (rows l >= P_START)], y = LN(x_out)."""
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    mask = r_ok[:, None] & c_ok[None, :]
    n = (rows // L).to(tl.int64)
    l = rows % L
    x = tl.load(X + n[:, None] * stride_xn + l[:, None] * stride_xl + cols[None, :] * stride_xc, mask=mask, other=0.0)
    acc = x.to(tl.float32)
    if HAS_RES:
        res = tl.load(RES + n[:, None] * stride_rn + l[:, None] * stride_rl + cols[None, :] * stride_rc,
                      mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if HAS_POS:
        pi = l - P_START
        p_ok = r_ok & (pi >= 0)
        pos = tl.load(POS + pi[:, None] * stride_pp + cols[None, :] * stride_pc, mask=p_ok[:, None] & c_ok[None, :],
                      other=0.0)
        acc += pos.to(tl.float32)
    # round to the storage dtype first, so y is the LayerNorm of exactly the x_out we return
    xo = acc.to(XO.dtype.element_ty)
    out_off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(XO + out_off, xo, mask=mask)
    y, mean, rstd = layernorm_rows(xo.to(tl.float32), cols, c_ok, C, eps, W, B, HAS_W, HAS_B)
    tl.store(Y + out_off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=r_ok)
    tl.store(Rstd + rows, rstd, mask=r_ok)


@triton.jit
def _apln_bwd_kernel(
    DXO, DY, XO, W, Mean, Rstd, DX, DW, DB,
    stride_an, stride_al, stride_ac,
    stride_yn, stride_yl, stride_yc,
    R, L, C, ROWS_PER_PROG,
    HAS_DXO: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = dx_out + LN'(dy); per-program partial sums of dweight / dbias (reduced on the host)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row0 = pid * ROWS_PER_PROG
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + start + tl.arange(0, BLOCK_R)
        r_ok = (rows < R) & (start + tl.arange(0, BLOCK_R) < ROWS_PER_PROG)
        mask = r_ok[:, None] & c_ok[None, :]
        n = (rows // L).to(tl.int64)
        l = rows % L
        off = rows.to(tl.int64)[:, None] * C + cols[None, :]
        xo = tl.load(XO + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + n[:, None] * stride_yn + l[:, None] * stride_yl + cols[None, :] * stride_yc,
                     mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=r_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (xo - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, 1) / C
        c2 = tl.sum(wdy, 1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DXO:
            dx += tl.load(DXO + n[:, None] * stride_an + l[:, None] * stride_al + cols[None, :] * stride_ac,
                          mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(DW + pid * C + cols, dw, mask=c_ok)
    tl.store(DB + pid * C + cols, db, mask=c_ok)


def _apln_blocks(c: int) -> Tuple[int, int, int]:
    block_c = _pow2_at_least(c, 16)
    block_r = max(1, min(16, 4096 // block_c))
    num_warps = 4 if block_c * block_r <= 4096 else 8
    return block_r, block_c, num_warps


def add_pos_layernorm_forward(
    x: torch.Tensor, pos: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, residual: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, L, c = x.shape
    weight, bias = contiguous_vectors(weight, bias)
    p = pos.shape[-2] if pos is not None else 0
    pos2 = pos.reshape(p, c) if pos is not None else x  # x: an unread stand-in without pos
    pos_strides = (pos2.stride(0), pos2.stride(1)) if pos is not None else (0, 0)
    res = residual if residual is not None else x
    R = n * L
    x_out = _new_output((n, L, c), x.device, x.dtype)
    y = _new_output((n, L, c), x.device, x.dtype)
    mean = _new_output((R,), x.device, torch.float32)
    rstd = _new_output((R,), x.device, torch.float32)
    if R == 0:
        return x_out, y, mean, rstd
    block_r, block_c, warps = _apln_blocks(c)
    _apln_fwd_kernel[(cdiv(R, block_r),)](
        x, pos2, weight if weight is not None else x, bias if bias is not None else x,
        x_out, y, mean, rstd, res,
        x.stride(0), x.stride(1), x.stride(2),
        *pos_strides,
        res.stride(0), res.stride(1), res.stride(2),
        R, L, c, L - p, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_POS=pos is not None, HAS_RES=residual is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps, **pdl_launch(x.device),
    )
    return x_out, y, mean, rstd


def add_pos_layernorm_backward(
    dx_out: Optional[torch.Tensor],
    dy: torch.Tensor,
    x_out: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, L, c = x_out.shape
    R = n * L
    (weight,) = contiguous_vectors(weight)
    dx = _new_output((n, L, c), x_out.device, x_out.dtype)
    if R == 0:
        z = torch.zeros((c,), device=x_out.device, dtype=torch.float32)
        return dx, z, z.clone()
    block_r, block_c, warps = _apln_blocks(c)
    if x_out.device.type == "cuda":
        n_prog = min(cdiv(R, block_r), 4 * torch.cuda.get_device_properties(x_out.device).multi_processor_count)
    else:
        n_prog = min(cdiv(R, block_r), 4)
    rows_per_prog = cdiv(R, n_prog)
    n_prog = cdiv(R, rows_per_prog)
    dw_part = _new_output((n_prog, c), x_out.device, torch.float32)
    db_part = _new_output((n_prog, c), x_out.device, torch.float32)
    a = dx_out if dx_out is not None else dy
    _apln_bwd_kernel[(n_prog,)](
        a, dy, x_out.contiguous(), weight if weight is not None else x_out, mean, rstd, dx, dw_part, db_part,
        a.stride(0), a.stride(1), a.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        R, L, c, rows_per_prog,
        HAS_DXO=dx_out is not None, HAS_W=weight is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return dx, dw_part.sum(0), db_part.sum(0)
