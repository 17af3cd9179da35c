"""Linear layers as one Triton GEMM: ``gelu(x @ weight^T + bias)`` (the TDE MLP's fc1) and
``x @ weight^T + bias``.

Eager PyTorch writes the Linear's output, then reads and writes it again for the GELU; in
the TDE (576 hidden units against 192) that is the largest activation of the layer. The
Triton kernel applies the bias and the erf GELU in its epilogue, before the single store.
``linear`` is the same GEMM without the GELU: for float32 it multiplies on the tensor cores
with 3xTF32 (fp32 accuracy, ``_utils.fp32_dot_precision``) where cuBLAS, with TF32 off, runs
FMA kernels; that is the case of fp32 inference at batch 1, the paper's FPS setting.

Public API
- ``linear_gelu(x, weight, bias=None, backend=None)``: x (..., K), weight (N, K), bias (N,)
  -> (..., N) in x's dtype, fp32 accumulation; GELU is the exact (erf) form, as ``nn.GELU()``.
- ``linear(x, weight, bias=None, backend=None)``: ``F.linear`` semantics, same shapes.
- ``linear_gelu_reference`` / ``linear_reference``: ``F.gelu(F.linear(...))`` / ``F.linear``.

Backends: "reference"; "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1); None/"auto": on
CUDA the Triton kernel where it was timed faster than cuBLAS (+ GELU) and agreed with it,
chosen once per (M, N, K, dtype, device, fp32 dot precision) outside a CUDA-graph capture (the
reference until then, and elsewhere). ``DISTILPOSE_LINEAR_GELU_AUTOTUNE=0`` makes "auto" use
the kernel on CUDA untimed; DISTILPOSE_FORCE_REFERENCE=1 makes it pick the reference.

Autocast: x, weight and bias are cast to the autocast dtype first, as ``F.linear`` does.
Autograd: ``torch.ops.distilpose.linear_gelu`` / ``linear`` have registered backwards that run
the GEMMs in PyTorch (linear_gelu recomputes the pre-activation: nothing extra is saved).
NaN propagates.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import (agrees_at_dtype, annotate, check_tensor, env_switch, fp32_dot_precision, lazy_module,
                     select_triton_backend, timed_choice)

__all__ = ["linear", "linear_gelu", "linear_gelu_reference", "linear_reference"]

AUTOTUNE_ENV = "DISTILPOSE_LINEAR_GELU_AUTOTUNE"
AUTOTUNE = env_switch(AUTOTUNE_ENV, True)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = lazy_module("distilpose_kernels.mlp_triton")
# (GELU, M, N, K, dtype, device index, fp32 dot precision) -> True: Triton kernel, False: reference
_CHOICE: Dict[tuple, bool] = {}


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_tensor("x", x, floating=True)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (..., K)")
    check_tensor("weight", weight, ndim=2, shape=(None, x.shape[-1]))
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (like x), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device} (like x), got one on {weight.device}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],))
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (like x), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device} (like x), got one on {bias.device}")


def linear_gelu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU)."""
    return F.gelu(F.linear(x, weight, bias))


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``."""
    return F.linear(x, weight, bias)


def _kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return _triton_module().linear_gelu_forward(x2, weight, bias, gelu).reshape(*x.shape[:-1], weight.shape[0])


def _agrees_tf32(got: Tensor, ref: Tensor) -> bool:
    return agrees_at_dtype(got, ref, 2e-2, 1e-3)


def _agrees_fp32(got: Tensor, ref: Tensor) -> bool:  # fp32-accurate dots (ieee / 3xTF32) vs cuBLAS fp32
    return agrees_at_dtype(got, ref, 2e-2, 1e-5)


def _choose(key: tuple, fused: Callable[[], Tensor], reference: Callable[[], Tensor]) -> bool:
    """Whether "auto" runs the kernel for ``key`` (``_utils.timed_choice``); ``key[-1]`` is the
    fp32 dot precision, which sets how close to cuBLAS fp32 the kernel must come."""
    agrees = _agrees_fp32 if key[-1] in ("ieee", "tf32x3") else _agrees_tf32
    what = "linear_gelu: the Triton kernel" if key[0] else "linear: the Triton kernel"
    return timed_choice(_CHOICE, key, fused, reference, agrees, what)


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str, gelu: bool) -> Tensor:
    ref = linear_gelu_reference if gelu else linear_reference
    if backend == "auto":
        if not x.is_cuda:
            backend = "reference"
        elif not AUTOTUNE:
            backend = "triton"
        else:
            prec = fp32_dot_precision(x.device) if x.dtype == torch.float32 else "tf32"
            key = (gelu, x.numel() // max(x.shape[-1], 1), weight.shape[0], x.shape[-1], x.dtype, x.device.index, prec)
            use = _choose(key, lambda: _kernel(x, weight, bias, gelu), lambda: ref(x, weight, bias))
            backend = "triton" if use else "reference"
    if backend == "triton":
        return _kernel(x, weight, bias, gelu)
    return ref(x, weight, bias)


def _interpret() -> bool:
    from ._utils import triton_interpret

    return triton_interpret()


def _setup_context(ctx, inputs, output):
    x, weight, bias, _backend = inputs
    ctx.save_for_backward(x, weight, bias)


def _linear_backward(ctx, gz):
    """Gradients of ``x @ weight^T + bias`` for the output gradient ``gz`` (PyTorch GEMMs)."""
    x, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = gz @ weight if need[0] else None
    g2, x2 = gz.reshape(-1, gz.shape[-1]), x.reshape(-1, x.shape[-1])
    gw = g2.t() @ x2 if need[1] else None
    gb = g2.sum(0) if bias is not None and need[2] else None
    return gx, gw, gb, None


def _gelu_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    z = F.linear(x, weight, bias).float()  # recomputed: the forward stored no pre-activation
    dgelu = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return _linear_backward(ctx, (grad.float() * dgelu).to(x.dtype))


def _register(name: str, gelu: bool, backward: Callable):
    """``torch.ops.distilpose.<name>(x, weight, bias, backend)``: the op with a fake kernel and
    a backward (what autograd and torch.compile see)."""

    def impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
        with torch.no_grad():
            if backend != "reference" and not x.is_cuda and not _interpret():
                backend = "reference"
            return _run(x, weight, bias, backend, gelu)

    op = torch.library.custom_op(f"distilpose::{name}", impl, mutates_args=())
    op.register_fake(lambda x, weight, bias, backend: x.new_empty((*x.shape[:-1], weight.shape[0])))
    op.register_autograd(backward, setup_context=_setup_context)
    return op


_linear_gelu_op = _register("linear_gelu", True, _gelu_backward)
_linear_op = _register("linear", False, _linear_backward)


def _call(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """The public ops: autocast casts, checks, backend choice; the torch.library op when autograd
    records the call or torch.compile traces it, else the kernel or reference directly."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t
                           for t in (x, weight, bias))
    _check(x, weight, bias)
    gelu = op == "linear_gelu"
    tensors = [t for t in (x, weight, bias) if t is not None]
    if select_triton_backend(op, tensors, backend, TRITON_DTYPES) == "reference":
        return (linear_gelu_reference if gelu else linear_reference)(x, weight, bias)
    mode = "triton" if backend == "triton" else "auto"
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling():
        return (_linear_gelu_op if gelu else _linear_op)(x, weight, bias, mode)
    return _run(x, weight, bias, mode, gelu)


@annotate("distilpose.linear_gelu")
def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``gelu(x @ weight^T + bias)`` with the exact GELU; x (..., K), weight (N, K), bias (N,)."""
    return _call("linear_gelu", x, weight, bias, backend)


@annotate("distilpose.linear")
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``x @ weight^T + bias`` (``F.linear``); x (..., K), weight (N, K), bias (N,) -> (..., N).
    "auto" on CUDA: the Triton GEMM where it was timed faster than cuBLAS (fp32: 3xTF32 tensor
    cores at fp32 accuracy), else cuBLAS."""
    return _call("linear", x, weight, bias, backend)
