"""Triton kernels for ``linear_gelu``, ``linear`` and ``mlp`` (imported only when the Triton path runs).

y = gelu_erf(x @ w^T + b) (or without the GELU): a tiled GEMM (fp32 accumulation) whose
epilogue adds the bias and applies the exact (erf) GELU before the single store, so the
pre-activation never goes to memory. Grouped program order for L2 reuse of x tiles. float32
operands get fp32-accurate dots (``_utils.fp32_dot_precision``: 3xTF32 on sm_80+). On a GPU the
tile is autotuned per (M, N, K) among a few shapes: small-M GEMMs (batch 1) need narrow tiles
to occupy the SMs, large ones wide tiles.

``_mlp_kernel``: fc2(gelu(fc1(x))) for a block of rows per program. The hidden activation is
made and consumed chunk by chunk (BLOCK_H columns at a time) inside the program: it is never
written to memory, and the output row block stays in registers until its single store. The
output width must fit one tile (N <= 512).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import cdiv, fp32_dot_precision, triton_interpret

_INTERPRET = triton_interpret()


class GemmTile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


DEFAULT_TILE = GemmTile(128, 64, 64, 4, 3)
#: tests pin a small tile (the interpreter is slow)
TILE_OVERRIDE: Optional[GemmTile] = None
#: output allocator (tests swap in a NaN-filled one)
_new_output = torch.empty


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST: the CPU interpreter multiplies bfloat16 operands
    wrongly, so there they are widened first."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


@triton.jit
def _linear_gelu_kernel(
    X, Wt, B, Y,
    M, N, K,
    sxm, sxk, swn, swk, sym, syn,
    HAS_B: tl.constexpr, GELU: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(X + rm.to(tl.int64)[:, None] * sxm + (k0 + rk)[None, :] * sxk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(Wt + (k0 + rk)[:, None] * swk + rn[None, :] * swn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION, UPCAST)
    if HAS_B:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    tl.store(Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    return fp32_dot_precision(device) if dtype == torch.float32 else "tf32"


#: autotuned tiles (GPU only): few, because each is compiled on first use of a shape
TUNE_TILES = (GemmTile(128, 64, 32, 4, 3), GemmTile(64, 64, 32, 4, 3), GemmTile(32, 64, 32, 4, 3))
_TUNED = None if _INTERPRET else triton.autotune(
    [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                   num_warps=t.num_warps, num_stages=t.num_stages) for t in TUNE_TILES],
    key=["M", "N", "K"],
)(_linear_gelu_kernel)


def linear_gelu_forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        gelu: bool = True) -> torch.Tensor:
    """x2 (M, K) any strides, weight (N, K), bias (N,) or None -> (M, N) in x2's dtype."""
    m, k = x2.shape
    n = weight.shape[0]
    y = _new_output((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:  # nothing to sum: gelu(bias)
        z = (bias.float() if bias is not None else torch.zeros(n, device=x2.device)).expand(m, n)
        y.copy_(torch.nn.functional.gelu(z) if gelu else z)
        return y
    args = (x2, weight, bias if bias is not None else weight, y, m, n, k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1))
    meta = dict(HAS_B=bias is not None, GELU=bool(gelu), PRECISION=_precision(x2.dtype, x2.device),
                UPCAST=_INTERPRET and x2.dtype == torch.bfloat16, GROUP_M=8)
    if _TUNED is not None and TILE_OVERRIDE is None and x2.is_cuda:
        _TUNED[lambda c: (cdiv(m, c["BLOCK_M"]) * cdiv(n, c["BLOCK_N"]),)](*args, **meta)
        return y
    t = TILE_OVERRIDE or DEFAULT_TILE
    _linear_gelu_kernel[(cdiv(m, t.block_m) * cdiv(n, t.block_n),)](
        *args, **meta, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return y


# ----------------------------------------------------------------------------- whole MLP


class MlpTile(NamedTuple):
    block_m: int
    block_h: int
    num_warps: int
    num_stages: int


#: tests pin a small tile (the interpreter is slow)
MLP_TILE_OVERRIDE: Optional[MlpTile] = None
MLP_TUNE_TILES = (MlpTile(64, 64, 8, 2), MlpTile(32, 64, 4, 2), MlpTile(128, 32, 8, 2))


@triton.jit
def _mlp_kernel(
    X, W1, B1, W2, B2, Y,
    M, K, HID, N,
    sxm, sxk, s1h, s1k, s2n, s2h, sym, syn,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rh = tl.arange(0, BLOCK_H)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = X + rm.to(tl.int64)[:, None] * sxm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        h_ok = (h0 + rh) < HID
        u = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(x_rows + (k0 + rk)[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(W1 + (k0 + rk)[:, None] * s1k + (h0 + rh)[None, :] * s1h,
                        mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            u += _dot(a, b, PRECISION, UPCAST)
        if HAS_B1:
            u += tl.load(B1 + h0 + rh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))  # padded columns: gelu(0) = 0
        w2 = tl.load(W2 + (h0 + rh)[:, None] * s2h + rn[None, :] * s2n, mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(u.to(W2.dtype.element_ty), w2, PRECISION, UPCAST)
    if HAS_B2:
        acc += tl.load(B2 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_MLP_TUNED = None if _INTERPRET else triton.autotune(
    [triton.Config({"BLOCK_M": t.block_m, "BLOCK_H": t.block_h}, num_warps=t.num_warps, num_stages=t.num_stages)
     for t in MLP_TUNE_TILES],
    key=["M", "K", "HID", "N"],
)(_mlp_kernel)


def mlp_forward(x2: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 (M, K) any strides, w1 (HID, K), w2 (N, HID) with N <= mlp.MLP_MAX_N -> (M, N) in x2's dtype."""
    m, k = x2.shape
    hid, n = w1.shape[0], w2.shape[0]
    y = _new_output((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0 or n == 0:
        return y
    block_n = max(16, 1 << (n - 1).bit_length())
    block_k = min(64, max(16, 1 << (k - 1).bit_length()))
    args = (x2, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, y, m, k, hid, n,
            x2.stride(0), x2.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
            y.stride(0), y.stride(1))
    meta = dict(HAS_B1=b1 is not None, HAS_B2=b2 is not None, PRECISION=_precision(x2.dtype, x2.device),
                UPCAST=_INTERPRET and x2.dtype == torch.bfloat16, BLOCK_K=block_k, BLOCK_N=block_n)
    if _MLP_TUNED is not None and MLP_TILE_OVERRIDE is None and x2.is_cuda:
        _MLP_TUNED[lambda c: (cdiv(m, c["BLOCK_M"]),)](*args, **meta)
        return y
    t = MLP_TILE_OVERRIDE or MLP_TUNE_TILES[0]
    _mlp_kernel[(cdiv(m, t.block_m),)](*args, **meta, BLOCK_M=t.block_m, BLOCK_H=t.block_h,
                                       num_warps=t.num_warps, num_stages=t.num_stages)
    return y
