"""Triton kernel for ``upsample_sum`` (imported only when the Triton path runs).

One pass over the output: out = act(base + sum_k term_k[h // s_k, w // s_k]), the terms being
lower-resolution maps upsampled by nearest neighbour with integer factors (1 for a full-size
term). Elements are visited in the output's memory order (NCHW or channels-last), so base
and out are read and written coalesced; the small terms are gathered (their lines are reused
by the s x s outputs that share them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import cdiv

MAX_TERMS = 3
BLOCK = 1024
#: int32 index math (64-bit division is slow): larger outputs take the reference path
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
    numel, C, H, W,
    bn, bc, bh, bw,
    t0n, t0c, t0h, t0w, S0,
    t1n, t1c, t1h, t1w, S1,
    t2n, t2c, t2h, t2w, S2,
    NT: tl.constexpr, CL: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: numel < 2**31 (checked by the op)
    m = idx < numel
    if CL:  # (n, h, w, c) memory order
        c = idx % C
        w = (idx // C) % W
        h = (idx // (C * W)) % H
        n = idx // (C * W * H)
    else:  # (n, c, h, w)
        w = idx % W
        h = (idx // W) % H
        c = (idx // (W * H)) % C
        n = idx // (W * H * C)
    acc = tl.load(BASE + n * bn + c * bc + h * bh + w * bw, mask=m, other=0.0).to(tl.float32)
    if NT > 0:
        acc = _term(acc, T0, n, c, h, w, t0n, t0c, t0h, t0w, S0, m)
    if NT > 1:
        acc = _term(acc, T1, n, c, h, w, t1n, t1c, t1h, t1w, S1, m)
    if NT > 2:
        acc = _term(acc, T2, n, c, h, w, t2n, t2c, t2h, t2w, S2, m)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu
    tl.store(OUT + idx, acc.to(OUT.dtype.element_ty), mask=m)  # OUT is dense in that order


def upsample_sum_forward(base: torch.Tensor, terms: Sequence[torch.Tensor], scales: Sequence[int],
                         relu: bool) -> torch.Tensor:
    """base (N, C, H, W); up to MAX_TERMS terms (N, C, H/s, W/s). Returns a new tensor, channels-last
    when base is (else contiguous)."""
    n, c, h, w = base.shape
    cl = base.dim() == 4 and base.is_contiguous(memory_format=torch.channels_last) and not base.is_contiguous()
    out = _empty_like(base, memory_format=torch.channels_last if cl else torch.contiguous_format)
    numel = out.numel()
    if numel == 0:
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
    _upsample_sum_kernel[(cdiv(numel, BLOCK),)](
        base, out, *ptrs, numel, c, h, w, *base.stride(), *args,
        NT=len(terms), CL=cl, RELU=bool(relu), BLOCK=BLOCK, num_warps=4,
    )
    return out
