"""Multi-resolution sum: ``act(base + sum_k upsample_nearest(terms[k], scales[k]))``.

HRNet fuses its branches this way: each output branch is its own map plus every other
branch brought to its resolution (lower ones by a 1x1 conv then nearest upsampling), then a
ReLU. Eager PyTorch writes each upsampled map to memory, adds them one by one and applies
the ReLU in yet another pass; for the highest-resolution branch of HRNet-W48 (48 x 64 x 48)
that is five full-size passes per term. Fused, the terms are read at their own (4x, 16x,
64x smaller) size and the output is written once.

Public API
- ``upsample_sum(base, terms, scales, relu=True, backend=None)``: base (N, C, H, W); terms:
  a sequence of (N, C, H/s, W/s) maps, s = scales[k] a positive int (1: a full-size term);
  returns (N, C, H, W) in base's dtype, channels-last when base is. fp32 accumulation.
- ``upsample_sum_reference``: ``F.interpolate(mode="nearest")`` + adds + ReLU (pure PyTorch).

Backends: "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1), "reference", None/"auto"
(Triton for CUDA tensors when installed and DISTILPOSE_FORCE_REFERENCE is unset). Up to 3
terms per kernel pass (more are folded in by further passes). Gradients flow to base and the
terms (ReLU mask, then sum pooling for the upsampled terms); ``torch.ops.distilpose.upsample_sum``
has a fake kernel and registered autograd. NaN policy: no scan; NaN propagates.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import annotate, check_tensor, lazy_module, select_triton_backend

__all__ = ["upsample_sum", "upsample_sum_reference"]

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = lazy_module("distilpose_kernels.multiscale_triton")


def _check(base: Tensor, terms: Sequence[Tensor], scales: Sequence[int]) -> None:
    check_tensor("base", base, ndim=4, floating=True)
    if not isinstance(terms, (list, tuple)):
        raise TypeError(f"terms: expected a list or tuple of tensors, got {type(terms).__name__}")
    if not isinstance(scales, (list, tuple)) or len(scales) != len(terms):
        raise ValueError(f"scales: expected a list of {len(terms)} ints (one per term), got {scales!r}")
    n, c, h, w = base.shape
    for k, (t, s) in enumerate(zip(terms, scales)):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"scales[{k}]: expected an int >= 1, got {s!r}")
        check_tensor(f"terms[{k}]", t, ndim=4)
        if t.shape[0] != n or t.shape[1] != c or t.shape[2] * s != h or t.shape[3] * s != w:
            raise ValueError(f"terms[{k}]: expected shape ({n}, {c}, {h}/{s}, {w}/{s}) for scale {s}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != base.dtype:
            raise TypeError(f"terms[{k}]: expected dtype {base.dtype} (like base), got {t.dtype}")
        if t.device != base.device:
            raise ValueError(f"terms[{k}]: expected a tensor on {base.device} (like base), got one on {t.device}")


def upsample_sum_reference(base: Tensor, terms: Sequence[Tensor], scales: Sequence[int], relu: bool = True) -> Tensor:
    """Pure PyTorch: base + each term upsampled (nearest, integer factor), then ReLU."""
    _check(base, terms, scales)
    out = base
    for t, s in zip(terms, scales):
        out = out + (t if s == 1 else F.interpolate(t, scale_factor=s, mode="nearest"))
    return torch.relu(out) if relu else (out if terms else out.clone())


def _fits_int32(base: Tensor, terms: Sequence[Tensor]) -> bool:
    lim = _triton_module().MAX_NUMEL
    dense = base.is_contiguous() or base.is_contiguous(memory_format=torch.channels_last)
    return dense and base.numel() <= lim and all(
        sum((d - 1) * st for d, st in zip(t.shape, t.stride())) < lim for t in terms)


def _out_format(base: Tensor) -> torch.memory_format:
    """The output layout of the op and its fake kernel: channels-last when base is, else
    contiguous (whatever the terms' layouts)."""
    cl = base.is_contiguous(memory_format=torch.channels_last) and not base.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _reference_in_layout(base: Tensor, terms: Sequence[Tensor], scales: Sequence[int], relu: bool) -> Tensor:
    """The reference with the kernel's output layout (the reference's own follows TensorIterator:
    a non-dense or permuted base would give strides the fake kernel does not promise)."""
    with torch.no_grad():
        out = upsample_sum_reference(base, terms, scales, relu)
    fmt = _out_format(base)
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def _forward(base: Tensor, terms: Sequence[Tensor], scales: Sequence[int], relu: bool) -> Tensor:
    """The Triton path: up to MAX_TERMS terms per pass, the ReLU in the last one."""
    mod = _triton_module()
    if not _fits_int32(base, terms):
        return _reference_in_layout(base, terms, scales, relu)
    terms, scales = list(terms), list(scales)
    out = base
    while True:
        chunk, terms = terms[: mod.MAX_TERMS], terms[mod.MAX_TERMS:]
        sc, scales = scales[: mod.MAX_TERMS], scales[mod.MAX_TERMS:]
        out = mod.upsample_sum_forward(out, chunk, sc, relu and not terms)
        if not terms:
            return out


def _backward_math(grad: Tensor, out: Tensor, term_shapes: List[List[int]], scales: Sequence[int],
                   relu: bool, need: Sequence[bool]):
    g = grad * (out > 0) if relu else grad
    grads = []
    for shape, s, want in zip(term_shapes, scales, need):
        if not want:
            grads.append(None)
        elif s == 1:
            grads.append(g)
        else:
            n, c, h, w = shape
            grads.append(g.reshape(n, c, h, s, w, s).sum(dim=(3, 5)))
    return g, grads


@torch.library.custom_op("distilpose::upsample_sum", mutates_args=())
def _upsample_sum_op(base: Tensor, terms: List[Tensor], scales: List[int], relu: bool) -> Tensor:
    with torch.no_grad():
        if base.dtype in TRITON_DTYPES and (base.is_cuda or (base.device.type == "cpu" and _interpret())):
            return _forward(base, terms, scales, relu)
        return _reference_in_layout(base, terms, scales, relu)


def _interpret() -> bool:
    from ._utils import triton_interpret

    return triton_interpret()


@_upsample_sum_op.register_fake
def _(base, terms, scales, relu):
    return torch.empty_like(base, memory_format=_out_format(base))


def _setup_context(ctx, inputs, output):
    base, terms, scales, relu = inputs
    ctx.save_for_backward(output)
    ctx.term_shapes = [list(t.shape) for t in terms]
    ctx.term_dtypes = [t.dtype for t in terms]
    ctx.scales = list(scales)
    ctx.relu = relu


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    need = ctx.needs_input_grad  # (bool, [bool per term], ...): torch.library unflattens it
    need_terms = list(need[1]) if isinstance(need[1], (list, tuple)) else [bool(need[1])] * len(ctx.term_shapes)
    g, grads = _backward_math(grad, out, ctx.term_shapes, ctx.scales, ctx.relu, need_terms)
    # the structure of the inputs: a list per term; an int list is one leaf (None), unless empty
    return (g if need[0] else None), grads, (None if ctx.scales else []), None


_upsample_sum_op.register_autograd(_backward, setup_context=_setup_context)


@annotate("distilpose.upsample_sum")
def upsample_sum(base: Tensor, terms: Sequence[Tensor], scales: Sequence[int], relu: bool = True,
                 backend: Optional[str] = None) -> Tensor:
    """``relu(base + sum_k upsample_nearest(terms[k], scales[k]))`` in one pass (see the module
    docstring). base (N, C, H, W); terms[k] (N, C, H/scales[k], W/scales[k])."""
    _check(base, terms, scales)
    relu = bool(relu)
    which = select_triton_backend("upsample_sum", [base, *terms], backend, TRITON_DTYPES, name="base")
    if which == "reference":
        return upsample_sum_reference(base, terms, scales, relu)
    tracked = torch.is_grad_enabled() and (base.requires_grad or any(t.requires_grad for t in terms))
    if tracked or torch.compiler.is_compiling():
        return _upsample_sum_op(base, list(terms), list(scales), relu)
    return _forward(base, terms, scales, relu)
