"""Triton kernel of ``conv2d_relu`` for convolutions with a short reduction (imported only when
the Triton path runs).

The stem of every backbone here starts with a 3 -> 64 channel 3x3 stride-2 convolution on the
RGB crop. With 3 input channels cuDNN has no tensor-core kernel for it and falls back to a
CUDA-core direct convolution: on an H200 at batch 256 (bf16, channels-last) that one conv took
989 us of an 11.8 ms DistilPose-S step, about 8x its memory time (the 403 MB output).

``_small_conv_relu_kernel`` is an implicit GEMM whose whole reduction (Cin * kh * kw = 27,
padded to 32) is one tensor-core dot: each program gathers BLOCK_P output pixels' input
patches straight from x (any strides: NCHW or channels-last; zero padding by masking), multiplies
them by the (27 x BLOCK_CO) weight tile, adds the bias, applies the ReLU and stores once. The
reduction index runs (kh, kw, ci), so for a channels-last x consecutive reduction entries are
consecutive in memory. Reductions longer than one block loop over it, BLOCK_K at a time, and a
residual (the Bottleneck's identity) is added before the ReLU: the same kernel is a candidate
for the Bottleneck convs at batch 1-2 (576-long reductions over 6,144 output pixels), where
cuDNN's fused kernels took 12-18 us each in the H200 batch-1 graph; "auto" times it per shape
(``conv_epilogue.TRITON_MAX_REDUCTION`` caps the reductions it considers).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_helpers import dot as _dot
from ._triton_helpers import pdl_enter
from ._utils import cdiv, contiguous_vectors, fp32_dot_precision, pdl_launch, triton_interpret

_INTERPRET = triton_interpret()
#: tests pin a small tile (BLOCK_P, BLOCK_CO, num_warps)
TILE_OVERRIDE: Optional[Tuple[int, int, int]] = None
#: output allocator, torch.empty's signature (tests swap in a NaN-filled one)
_new_output = torch.empty


@triton.jit
def _small_conv_relu_kernel(
    X, Wt, B, R, Y,
    N, CIN, H, W, COUT, HO, WO,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """relu(conv2d(x, w) + b [+ r]) for BLOCK_P output pixels (flat over N x HO x WO) and
    BLOCK_CO output channels."""
    pdl_enter(USE_PDL)
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = rp < N * HO * WO
    n = (rp // (HO * WO)).to(tl.int64)
    rem = rp % (HO * WO)
    oh = rem // WO
    ow = rem % WO
    rc = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    c_ok = rc < COUT
    ktot = CIN * KH * KW
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for k0 in range(0, ktot, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < ktot
        ci = rk % CIN
        tap = rk // CIN
        kh = tap // KW
        kw = tap % KW
        ih = oh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
        in_ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(X + n[:, None] * sxn + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=in_ok, other=0.0)
        b = tl.load(Wt + rc[None, :] * swo + ci[:, None] * swi + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION, UPCAST)
    if HAS_B:
        acc += tl.load(B + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_R:  # the block's residual, added before the ReLU (as cudnn_convolution_add_relu)
        r = R + n[:, None] * srn + rc[None, :] * src + oh[:, None] * srh + ow[:, None] * srw
        acc += tl.load(r, mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in the reference
    y = Y + n[:, None] * syn + rc[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(Y.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


#: (BLOCK_P, BLOCK_CO, num_warps) candidates of the GPU autotuner: at most 32 output elements per
#: thread (more spilled: 128 x 64 on 4 warps and 256 x 64 on 8 had 0.6-3.3 KB stack frames for
#: sm_90, tools-free check with cuobjdump); (32, 64): more programs for small launches (batch 1-2
#: Bottlenecks: 6,144 output pixels)
TUNE_TILES = ((128, 64, 8), (64, 64, 4), (32, 64, 4))
_TUNED = None if _INTERPRET else triton.autotune(
    [triton.Config({"BLOCK_P": p, "BLOCK_CO": c}, num_warps=w, num_stages=2) for p, c, w in TUNE_TILES],
    key=["N", "CIN", "COUT", "HO", "WO", "KH", "KW", "PRECISION"],
)(_small_conv_relu_kernel)


def small_conv_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                            dilation, out_shape: Tuple[int, int, int, int],
                            memory_format: torch.memory_format,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (N, Cin, H, W) any strides, weight (Cout, Cin, kh, kw) any strides, bias (Cout,) or None,
    residual (N, Cout, Ho, Wo) any strides or None -> relu(conv2d(x, weight, bias) + residual)
    (N, Cout, Ho, Wo) in x's dtype and ``memory_format``."""
    n, cout, ho, wo = out_shape
    cin, kh, kw = weight.shape[1:]
    (bias,) = contiguous_vectors(bias)
    y = _new_output(out_shape, device=x.device, dtype=x.dtype, memory_format=memory_format)
    if y.numel() == 0:
        return y
    ktot = cin * kh * kw
    # a short reduction (the RGB stem, 27) in one block; longer ones 16 at a time (the gathered
    # A tile's pointers and masks: BLOCK_K = 32 spilled next to a residual epilogue)
    block_k = max(16, 1 << (ktot - 1).bit_length()) if ktot <= 32 else 16
    precision = fp32_dot_precision(x.device) if x.dtype == torch.float32 else "tf32"
    res = residual if residual is not None else y
    args = (x, weight, bias if bias is not None else weight, res, y, n, cin, x.shape[2], x.shape[3], cout, ho, wo,
            *x.stride(), *weight.stride(), *res.stride(), *y.stride(), *stride, *padding, *dilation)
    meta = dict(KH=kh, KW=kw, HAS_B=bias is not None, HAS_R=residual is not None, PRECISION=precision,
                UPCAST=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_K=block_k, **pdl_launch(x.device))
    pixels = n * ho * wo
    if _TUNED is not None and TILE_OVERRIDE is None and x.is_cuda:
        _TUNED[lambda c: (cdiv(pixels, c["BLOCK_P"]), cdiv(cout, c["BLOCK_CO"]))](*args, **meta)
        return y
    bp, bc, warps = TILE_OVERRIDE or TUNE_TILES[0]
    _small_conv_relu_kernel[(cdiv(pixels, bp), cdiv(cout, bc))](*args, **meta, BLOCK_P=bp, BLOCK_CO=bc,
                                                                num_warps=warps)
    return y
