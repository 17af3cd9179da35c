"""Triton kernel for ``upsample_sum`` (imported only when the Triton path runs).

One pass over the output: out = act(base + sum_k term_k[h // s_k, w // s_k]), the terms being
lower-resolution maps upsampled by nearest neighbour with integer factors (1 for a full-size
term). Each program owns a 2-D tile laid out along the output's memory order, so no
per-element index division is needed (integer division costs tens of instructions on a GPU):
- channels-last: one (n, h) row per program, a (BLOCK_A = w, BLOCK_B = c) tile;
- NCHW: one (n, c) plane per program, a (BLOCK_A = h, BLOCK_B = w) tile.
Base and out are read and written coalesced along the inner axis; the small terms are
gathered (their lines are reused by the s x s outputs that share them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._triton_helpers import pdl_enter
from ._utils import cdiv, next_pow2, pdl_launch

MAX_TERMS = 3
#: int32 offsets (64-bit math is slow): larger tensors take the reference path
MAX_NUMEL = 2**31 - 1
#: output allocator (tests swap in a NaN-filled one to prove every element is written)
_empty_like = torch.empty_like


@triton.jit
def _term(acc, T, n, c, h, w, sn, sc, sh, sw, S, m):
    v = tl.load(T + n * sn + c * sc + (h // S) * sh + (w // S) * sw, mask=m, other=0.0)
    return acc + v.to(tl.float32)


@triton.jit
def _upsample_sum_kernel(
    BASE, OUT, T0, T1, T2,
    C, H, W,
    bn, bc, bh, bw,
    on, oc, oh, ow,
    t0n, t0c, t0h, t0w, S0,
    t1n, t1c, t1h, t1w, S1,
    t2n, t2c, t2h, t2w, S2,
    NT: tl.constexpr, CL: tl.constexpr, RELU: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    p0 = tl.program_id(0)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    if CL:  # p0 = (n, h); tile (w, c)
        n = p0 // H
        h = p0 % H
        w = a[:, None]
        c = b[None, :]
        m = (w < W) & (c < C)
    else:  # p0 = (n, c); tile (h, w)
        n = p0 // C
        c = p0 % C
        h = a[:, None]
        w = b[None, :]
        m = (h < H) & (w < W)
    acc = tl.load(BASE + n * bn + c * bc + h * bh + w * bw, mask=m, other=0.0).to(tl.float32)
    if NT > 0:
        acc = _term(acc, T0, n, c, h, w, t0n, t0c, t0h, t0w, S0, m)
    if NT > 1:
        acc = _term(acc, T1, n, c, h, w, t1n, t1c, t1h, t1w, S1, m)
    if NT > 2:
        acc = _term(acc, T2, n, c, h, w, t2n, t2c, t2h, t2w, S2, m)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu
    tl.store(OUT + n * on + c * oc + h * oh + w * ow, acc.to(OUT.dtype.element_ty), mask=m)


def _tile(inner: int) -> tuple:
    """(BLOCK_A, BLOCK_B): the inner axis padded to a power of two (at most 256), about 1024
    elements per program."""
    block_b = min(256, max(16, next_pow2(inner)))
    return max(1, 1024 // block_b), block_b


def upsample_sum_forward(base: torch.Tensor, terms: Sequence[torch.Tensor], scales: Sequence[int],
                         relu: bool) -> torch.Tensor:
    """base (N, C, H, W); up to MAX_TERMS terms (N, C, H/s, W/s). Returns a new tensor,
    channels-last when base is (else contiguous)."""
    n, c, h, w = base.shape
    cl = base.is_contiguous(memory_format=torch.channels_last) and not base.is_contiguous()
    out = _empty_like(base, memory_format=torch.channels_last if cl else torch.contiguous_format)
    if out.numel() == 0:
        return out
    args = []
    ptrs = []
    for k in range(MAX_TERMS):
        if k < len(terms):
            t = terms[k]
            ptrs.append(t)
            args += [*t.stride(), int(scales[k])]
        else:
            ptrs.append(base)
            args += [0, 0, 0, 0, 1]
    if cl:
        block_a, block_b = _tile(c)
        grid = (n * h, cdiv(w, block_a), cdiv(c, block_b))
    else:
        block_a, block_b = _tile(w)
        grid = (n * c, cdiv(h, block_a), cdiv(w, block_b))
    _upsample_sum_kernel[grid](
        base, out, *ptrs, c, h, w, *base.stride(), *out.stride(), *args,
        NT=len(terms), CL=cl, RELU=bool(relu), BLOCK_A=block_a, BLOCK_B=block_b, num_warps=4, **pdl_launch(base.device),
    )
    return out
