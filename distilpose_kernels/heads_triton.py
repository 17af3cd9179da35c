"""Triton kernel of ``regression_head`` (imported only when the Triton path runs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_helpers import pdl_enter
from ._utils import cdiv, next_pow2, pdl_launch

#: output allocator, torch.empty's signature (tests swap in a NaN-filled one)
_new_output = torch.empty
BLOCK_R = 16


@triton.jit
def _regression_head_kernel(
    X, LNW, LNB, FW, FB, Y, R, K, D, sxb, sxk, sxd, sfo, sfd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """BLOCK_R tokens (row r = b * K + k of X (B, K, D), any strides): LayerNorm (fp32
    statistics) -> Linear(D, 5) -> per column sigmoid, sigmoid, identity, softplus, softplus;
    Y (R, 5) contiguous fp32."""
    pdl_enter(USE_PDL)
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.arange(0, BLOCK_D)
    r_ok = rr < R
    d_ok = rd < D
    m = r_ok[:, None] & d_ok[None, :]
    row = (rr // K).to(tl.int64) * sxb + (rr % K).to(tl.int64) * sxk
    x = tl.load(X + row[:, None] + rd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(LNW + rd, mask=d_ok, other=0.0).to(tl.float32)
    b = tl.load(LNB + rd, mask=d_ok, other=0.0).to(tl.float32)
    xn = xc * rstd[:, None] * w[None, :] + b[None, :]
    for j in tl.static_range(5):
        fw = tl.load(FW + j * sfo + rd * sfd, mask=d_ok, other=0.0).to(tl.float32)
        y = tl.sum(xn * fw[None, :], axis=1) + tl.load(FB + j).to(tl.float32)
        if j < 2:  # coords: sigmoid
            y = 1.0 / (1.0 + tl.exp(-y))
        elif j > 2:  # sigmas: softplus (beta 1, threshold 20, as F.softplus)
            # max(y, 0) + log1p(exp(-|y|)); log1p(z) = log(u) * z / (u - 1), u = 1 + z (exact
            # where 1 + z rounds to 1: then z itself)
            z = tl.exp(-tl.abs(y))
            u = 1.0 + z
            l1p = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
            y = tl.where(y > 20.0, y, tl.maximum(y, 0.0) + l1p)
        tl.store(Y + rr.to(tl.int64) * 5 + j, y, mask=r_ok)


def regression_head(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, fc_w: torch.Tensor,
                    fc_b: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, K, D) any strides; ln_w / ln_b (D,), fc_w (5, D), fc_b (5,) contiguous -> (B*K, 5) fp32."""
    b, k, d = x.shape
    r = b * k
    y = _new_output((r, 5), device=x.device, dtype=torch.float32)
    if r == 0:
        return y
    block_d = max(16, next_pow2(d))
    _regression_head_kernel[(cdiv(r, BLOCK_R),)](
        x, ln_w, ln_b, fc_w, fc_b, y, r, max(k, 1), d, *x.stride(), *fc_w.stride(), float(eps),
        BLOCK_R=BLOCK_R, BLOCK_D=block_d, num_warps=4, **pdl_launch(x.device),
    )
    return y
