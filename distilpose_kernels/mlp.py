"""Linear + bias + exact GELU in one kernel: ``gelu(x @ weight^T + bias)`` (the TDE MLP's fc1).

Eager PyTorch writes the Linear's output, then reads and writes it again for the GELU; in
the TDE (576 hidden units against 192) that is the largest activation of the layer. The
Triton kernel applies the bias and the erf GELU in its epilogue, before the single store.

Public API
- ``linear_gelu(x, weight, bias=None, backend=None)``: x (..., K), weight (N, K), bias (N,)
  -> (..., N) in x's dtype, fp32 accumulation; GELU is the exact (erf) form, as ``nn.GELU()``.
- ``linear_gelu_reference``: ``F.gelu(F.linear(x, weight, bias))`` (pure PyTorch).

Backends: "reference"; "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1); None/"auto": on
CUDA the Triton kernel where it was timed faster than cuBLAS + GELU and agreed with them,
chosen once per (M, N, K, dtype, device) outside a CUDA-graph capture (the reference until
then, and elsewhere). ``DISTILPOSE_LINEAR_GELU_AUTOTUNE=0`` makes "auto" use the kernel on
CUDA untimed; DISTILPOSE_FORCE_REFERENCE=1 makes it pick the reference.

Autocast: x, weight and bias are cast to the autocast dtype first, as ``F.linear`` does.
Autograd: ``torch.ops.distilpose.linear_gelu`` has a registered backward that recomputes the
pre-activation (nothing extra is saved) and runs the GEMMs in PyTorch. NaN propagates.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import agrees_at_dtype, annotate, check_tensor, env_switch, lazy_module, select_triton_backend, timed_choice

__all__ = ["linear_gelu", "linear_gelu_reference"]

AUTOTUNE_ENV = "DISTILPOSE_LINEAR_GELU_AUTOTUNE"
AUTOTUNE = env_switch(AUTOTUNE_ENV, True)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = lazy_module("distilpose_kernels.mlp_triton")
# (M, N, K, dtype, device index, TF32 flag) -> True: Triton kernel, False: reference
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


def _kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return _triton_module().linear_gelu_forward(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def _agrees(got: Tensor, ref: Tensor) -> bool:
    return agrees_at_dtype(got, ref, 2e-2, 1e-3)


def _choose(key: tuple, fused: Callable[[], Tensor], reference: Callable[[], Tensor]) -> bool:
    """Whether "auto" runs the kernel for ``key`` (``_utils.timed_choice``)."""
    return timed_choice(_CHOICE, key, fused, reference, _agrees, "linear_gelu: the Triton kernel")


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    if backend == "auto":
        if not x.is_cuda:
            backend = "reference"
        elif not AUTOTUNE:
            backend = "triton"
        else:
            key = (x.numel() // max(x.shape[-1], 1), weight.shape[0], x.shape[-1], x.dtype, x.device.index,
                   torch.backends.cuda.matmul.allow_tf32)
            use = _choose(key, lambda: _kernel(x, weight, bias), lambda: linear_gelu_reference(x, weight, bias))
            backend = "triton" if use else "reference"
    if backend == "triton":
        return _kernel(x, weight, bias)
    return linear_gelu_reference(x, weight, bias)


@torch.library.custom_op("distilpose::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    with torch.no_grad():
        if backend != "reference" and not x.is_cuda and not _interpret():
            backend = "reference"
        return _run(x, weight, bias, backend)


def _interpret() -> bool:
    from ._utils import triton_interpret

    return triton_interpret()


@_linear_gelu_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _backend = inputs
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    z = F.linear(x, weight, bias).float()  # recomputed: the forward stored no pre-activation
    dgelu = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    gz = (grad.float() * dgelu).to(x.dtype)
    need = ctx.needs_input_grad
    gx = gz @ weight if need[0] else None
    g2, x2 = gz.reshape(-1, gz.shape[-1]), x.reshape(-1, x.shape[-1])
    gw = g2.t() @ x2 if need[1] else None
    gb = g2.sum(0) if bias is not None and need[2] else None
    return gx, gw, gb, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


@annotate("distilpose.linear_gelu")
def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``gelu(x @ weight^T + bias)`` with the exact GELU; x (..., K), weight (N, K), bias (N,)."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t
                           for t in (x, weight, bias))
    _check(x, weight, bias)
    tensors = [t for t in (x, weight, bias) if t is not None]
    which = select_triton_backend("linear_gelu", tensors, backend, TRITON_DTYPES)
    if which == "reference":
        return linear_gelu_reference(x, weight, bias)
    mode = "triton" if backend == "triton" else "auto"
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if tracked or torch.compiler.is_compiling():
        return _linear_gelu_op(x, weight, bias, mode)
    return _run(x, weight, bias, mode)
