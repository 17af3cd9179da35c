"""Linear layers as one Triton GEMM: ``gelu(x @ weight^T + bias)`` (the TDE MLP's fc1) and
``x @ weight^T + bias``; and the whole MLP as one kernel.

Eager PyTorch writes the Linear's output, then reads and writes it again for the GELU; in
the TDE (576 hidden units against 192) that is the largest activation of the layer. The
Triton kernel applies the bias and the erf GELU in its epilogue, before the single store.
``linear`` is the same GEMM without the GELU: for float32 it multiplies on the tensor cores
with 3xTF32 (fp32 accuracy, ``_utils.fp32_dot_precision``) where cuBLAS, with TF32 off, runs
FMA kernels; that is the case of fp32 inference at batch 1, the paper's FPS setting.

``fused_mlp`` is the whole transformer MLP, fc2(gelu(fc1(x))), in one kernel: the hidden
activation (576 wide in the TDE, 3x the tokens' width) is made and consumed in chunks inside
each program and never written; at batch 256 that is most of the MLP's memory traffic.

``linear_add_norm`` / ``fused_mlp_add_norm`` finish a pre-norm transformer step in the
kernel's epilogue: a program holds whole output rows, so it adds the residual stream (and the
position table on the visual tokens), stores it, and stores its LayerNorm. The TDE's attention
projection and MLP then need no separate add + LayerNorm kernel (inference; with autograd they
run the reference ops). At small row counts (batch 1) ``linear_add_norm`` and the whole-MLP
kernels may instead run split tiles (K slices, hidden slices) whose row block's last program
sums fp32 partials and runs the epilogue (``mlp_triton.SplitTile``, ``SplitMlpTile``).

Public API
- ``linear_gelu(x, weight, bias=None, backend=None)``: x (..., K), weight (N, K), bias (N,)
  -> (..., N) in x's dtype, fp32 accumulation; GELU is the exact (erf) form, as ``nn.GELU()``.
- ``linear(x, weight, bias=None, backend=None)``: ``F.linear`` semantics, same shapes.
- ``fused_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend=None)``: x (..., K),
  fc1_weight (HID, K), fc2_weight (N, HID), N <= 512 -> (..., N).
- ``linear_add_norm(x, weight, bias, residual, norm_weight, norm_bias, eps=1e-5, pos=None,
  backend=None)``: x (B, L, K), residual (B, L, N), pos (1, P, N) / (P, N) on the last P
  tokens -> (x_out = residual + x @ weight^T + bias [+ pos], y = LayerNorm(x_out)); N <= 512.
- ``fused_mlp_add_norm(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, norm_weight,
  norm_bias, eps=1e-5, pos=None, backend=None)``: the same with ``fused_mlp(x, ...)``.
- ``*_reference``: the same in PyTorch.

Backends: "reference"; "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1); None/"auto": on
CUDA the Triton kernel where it was timed faster than cuBLAS (+ GELU) and agreed with it,
chosen once per (M, N, K, dtype, device, fp32 dot precision) outside a CUDA-graph capture (the
reference until then, and elsewhere). ``DISTILPOSE_LINEAR_GELU_AUTOTUNE=0`` makes "auto" use
the kernel on CUDA untimed; DISTILPOSE_FORCE_REFERENCE=1 makes it pick the reference.

Autocast: x, weight and bias are cast to the autocast dtype first, as ``F.linear`` does.
Autograd: ``torch.ops.distilpose.linear_gelu`` / ``linear`` / ``fused_mlp`` have registered
backwards that run the GEMMs in PyTorch (recomputing the pre-activation: nothing extra is saved).
NaN propagates.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import add_pos_layernorm, add_pos_layernorm_reference
from ._utils import (agrees_at_dtype, annotate, check_tensor, env_switch, fp32_dot_precision, lazy_module,
                     select_triton_backend, timed_choice)

__all__ = ["fused_mlp", "fused_mlp_add_norm", "fused_mlp_add_norm_reference", "fused_mlp_reference", "linear",
           "linear_add_norm", "linear_add_norm_reference", "linear_gelu", "linear_gelu_reference", "linear_reference"]

AUTOTUNE_ENV = "DISTILPOSE_LINEAR_GELU_AUTOTUNE"
AUTOTUNE = env_switch(AUTOTUNE_ENV, True)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = lazy_module("distilpose_kernels.mlp_triton")
# (GELU or "mlp", sizes..., dtype, device index, fp32 dot precision) -> True: Triton kernel, False: reference
_CHOICE: Dict[tuple, bool] = {}
#: the widest MLP output the fused kernel keeps in registers; wider ones run the reference
MLP_MAX_N = 512


def _check_like(name: str, t: Tensor, x: Tensor, **shape) -> None:
    check_tensor(name, t, **shape)
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (like x), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got one on {t.device}")


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], wname: str = "weight", bname: str = "bias") -> None:
    check_tensor("x", x, floating=True)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (..., K)")
    _check_like(wname, weight, x, ndim=2, shape=(None, x.shape[-1]))
    if bias is not None:
        _check_like(bname, bias, x, shape=(weight.shape[0],))


def _autocast_inputs(x: Tensor, *weights: Optional[Tensor]) -> tuple:
    """(x, *weights) cast to the autocast dtype, as F.linear does (float64 tensors stay, as autocast
    leaves them); unchanged outside autocast."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return tuple(t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                     for t in (x, *weights))
    return (x, *weights)


def _check_weights(x: Tensor, weights: tuple) -> None:
    """(weight, bias) of a Linear, or (fc1_weight, fc1_bias, fc2_weight, fc2_bias) of the MLP."""
    if len(weights) == 2:
        _check(x, *weights)
        return
    _check(x, weights[0], weights[1], "fc1_weight", "fc1_bias")
    _check_like("fc2_weight", weights[2], x, ndim=2, shape=(None, weights[0].shape[0]))
    if weights[3] is not None:
        _check_like("fc2_bias", weights[3], x, shape=(weights[2].shape[0],))


def _row_kernel_backend(op: str, tensors: list, backend: Optional[str], n: int, wname: str) -> str:
    """select_triton_backend, plus the row kernels' limit: outputs wider than MLP_MAX_N run the
    reference ("auto") or raise (backend="triton")."""
    which = select_triton_backend(op, tensors, backend, TRITON_DTYPES)
    if which != "reference" and n > MLP_MAX_N:
        if backend == "triton":
            raise ValueError(f"{wname}: backend='triton' supports at most {MLP_MAX_N} output features, got {n}")
        which = "reference"
    return which


def linear_gelu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU)."""
    return F.gelu(F.linear(x, weight, bias))


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``."""
    return F.linear(x, weight, bias)


def _rows(t: Tensor) -> Tensor:
    """t (..., C) as (rows, C); unlike reshape(-1, C) also when C == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    x2 = _rows(x)
    return _triton_module().linear_gelu_forward(x2, weight, bias, gelu).reshape(*x.shape[:-1], weight.shape[0])


def _agrees_tf32(got: Tensor, ref: Tensor) -> bool:
    return agrees_at_dtype(got, ref, 2e-2, 1e-3)


def _agrees_fp32(got: Tensor, ref: Tensor) -> bool:  # fp32-accurate dots (ieee / 3xTF32) vs cuBLAS fp32
    return agrees_at_dtype(got, ref, 2e-2, 1e-5)


def _agrees_16bit(got: Tensor, ref: Tensor) -> bool:
    """16-bit operands: both sides round the GEMM to bf16/fp16 precision, so they may differ by
    that much even where the outputs are float32 (the add + LayerNorm epilogues under autocast,
    whose reference rounds the GEMM's output to 16 bits before the float32 add)."""
    return agrees_at_dtype(got, ref, 2e-2, 2e-2)


def _choose(key: tuple, fused: Callable[[], Tensor], reference: Callable[[], Tensor], op: str = "linear_gelu",
            what: Optional[str] = None) -> bool:
    """Whether "auto" runs ``fused`` (by default ``op``'s kernel) rather than ``reference`` for
    ``key`` (``_utils.timed_choice``); ``key[-1]`` is the dot precision ("ieee" / "tf32x3" /
    "tf32" for float32 operands, "16bit" for fp16/bf16 ones), which sets how close to the
    cuBLAS reference the kernel must come."""
    if key[-1] in ("ieee", "tf32x3"):
        agrees = _agrees_fp32
    elif key[-1] == "16bit":
        agrees = _agrees_16bit
    else:
        agrees = _agrees_tf32
    return timed_choice(_CHOICE, key, fused, reference, agrees, what or f"{op}: the Triton kernel")


def _precision_key(x: Tensor) -> str:
    return fp32_dot_precision(x.device) if x.dtype == torch.float32 else "16bit"


def _dispatch(backend: str, x: Tensor, key: Callable[[], tuple], op: str, kernel: Callable[[], Tensor],
              reference: Callable[[], Tensor],
              alternative: Optional[Tuple[str, Callable[[], Tensor]]] = None) -> Tensor:
    """Run ``kernel`` or ``reference`` for ``backend`` ("triton", "reference" or "auto": on CUDA
    the timed choice for ``key()``, the reference elsewhere). ``alternative`` (name, fn): another
    way to the same result (the whole MLP as two GEMM ops) that "auto" then times against the
    first choice, under its own key."""
    if backend == "auto":
        if not x.is_cuda:
            backend = "reference"
        elif not AUTOTUNE:
            backend = "triton"
        else:
            k = key()
            if torch.is_autocast_enabled(x.device.type):
                # the reference runs autocast's ops (fp32 LayerNorm outputs...): a decision made
                # under autocast says nothing about the same dtypes without it (a bf16-cast model)
                k = ("autocast",) + k
            backend = "triton" if _choose(k, kernel, reference, op) else "reference"
            if alternative is not None:
                name, alt = alternative
                first = kernel if backend == "triton" else reference
                # the precision stays last in the key: it sets the agreement tolerance
                if _choose((name,) + k, alt, first, op, f"{op}: the {name} form"):
                    return alt()
    return kernel() if backend == "triton" else reference()


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str, gelu: bool) -> Tensor:
    ref = linear_gelu_reference if gelu else linear_reference
    return _dispatch(
        backend, x,
        lambda: (gelu, math.prod(x.shape[:-1]), weight.shape[0], x.shape[-1], x.dtype, x.device.index,
                 _precision_key(x)),
        "linear_gelu" if gelu else "linear", lambda: _kernel(x, weight, bias, gelu), lambda: ref(x, weight, bias))


def _interpret() -> bool:
    from ._utils import triton_interpret

    return triton_interpret()


def _setup_context(ctx, inputs, output):
    x, weight, bias, _backend = inputs
    ctx.save_for_backward(x, weight, bias)


def _gemm_grads(gz: Tensor, x: Tensor, weight: Tensor, has_bias: bool, need) -> tuple:
    """(dx, dweight, dbias) of ``x @ weight^T (+ bias)`` for the output gradient ``gz`` (PyTorch
    GEMMs); ``need``: which of the three are wanted."""
    gx = gz @ weight if need[0] else None
    g2, x2 = _rows(gz), _rows(x)
    gw = g2.t() @ x2 if need[1] else None
    gb = g2.sum(0) if has_bias and need[2] else None
    return gx, gw, gb


def _gelu_grad(grad: Tensor, z: Tensor) -> Tensor:
    """d gelu(z) / dz * grad (exact erf GELU), in fp32 (float64 for float64 z), returned in z's dtype."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    d = 0.5 * (1.0 + torch.erf(zf * (1.0 / math.sqrt(2.0)))) + zf * torch.exp(-0.5 * zf * zf) / math.sqrt(2.0 * math.pi)
    return (grad.to(zf.dtype) * d).to(z.dtype)


def _linear_backward(ctx, gz):
    x, weight, bias = ctx.saved_tensors
    return (*_gemm_grads(gz, x, weight, bias is not None, ctx.needs_input_grad), None)


def _gelu_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    z = F.linear(x, weight, bias)  # recomputed: the forward stored no pre-activation
    return (*_gemm_grads(_gelu_grad(grad, z), x, weight, bias is not None, ctx.needs_input_grad), None)


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
    x, weight, bias = _autocast_inputs(x, weight, bias)
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


# ----------------------------------------------------------------------------- the whole MLP


def fused_mlp_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                  fc2_bias: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _mlp_fused(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    x2 = _rows(x)
    return _triton_module().mlp_forward(x2, w1, b1, w2, b2).reshape(*x.shape[:-1], w2.shape[0])


def _mlp_run(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], backend: str) -> Tensor:
    return _dispatch(
        backend, x,
        lambda: ("mlp", math.prod(x.shape[:-1]), x.shape[-1], w1.shape[0], w2.shape[0], x.dtype,
                 x.device.index, _precision_key(x)),
        "fused_mlp", lambda: _mlp_fused(x, w1, b1, w2, b2), lambda: fused_mlp_reference(x, w1, b1, w2, b2),
        # the whole MLP as two GEMM ops (fc1 + GELU, then fc2), each with its own "auto" choice:
        # at small row counts they may beat one kernel, so "auto" times them as a third way
        ("linear_gelu + linear", lambda: linear(linear_gelu(x, w1, b1), w2, b2)))


@torch.library.custom_op("distilpose::fused_mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], backend: str) -> Tensor:
    with torch.no_grad():
        if backend != "reference" and not x.is_cuda and not _interpret():
            backend = "reference"
        return _mlp_run(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend):
    return x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, _backend = inputs
    ctx.save_for_backward(x, w1, b1, w2)
    ctx.has_b2 = b2 is not None


def _mlp_backward(ctx, grad):
    x, w1, b1, w2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    z = F.linear(x, w1, b1)  # recomputed: the forward stored no hidden activation
    _, gw2, gb2 = _gemm_grads(grad, F.gelu(z), w2, ctx.has_b2, (False, need[3], need[4]))
    gx, gw1, gb1 = _gemm_grads(_gelu_grad(grad @ w2, z), x, w1, b1 is not None, need[:3])
    return gx, gw1, gb1, gw2, gb2, None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


@annotate("distilpose.fused_mlp")
def fused_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
        backend: Optional[str] = None) -> Tensor:
    """``fc2(gelu(fc1(x)))`` (exact GELU) in one kernel; x (..., K), fc1_weight (HID, K),
    fc1_bias (HID,), fc2_weight (N, HID), fc2_bias (N,) -> (..., N). The hidden activation is
    never written to memory. "auto" on CUDA: the kernel where it was timed faster than cuBLAS +
    GELU + cuBLAS and agreed with them. Outputs wider than ``MLP_MAX_N`` run the reference."""
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = _autocast_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_weights(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    tensors = [t for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) if t is not None]
    which = _row_kernel_backend("fused_mlp", tensors, backend, fc2_weight.shape[0], "fc2_weight")
    if which == "reference":
        return fused_mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    mode = "triton" if backend == "triton" else "auto"
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling():
        return _mlp_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mode)
    return _mlp_run(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mode)


# ----------------------------------------------------------------------------- + residual + LayerNorm


def linear_add_norm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor,
                              norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float = 1e-5,
                              pos: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``x_out = residual + F.linear(x, weight, bias)`` (+ pos on the last P tokens),
    ``(x_out, F.layer_norm(x_out, ...))``."""
    # the residual stream is the reference's x: x_out in its dtype
    return add_pos_layernorm_reference(residual, pos, norm_weight, norm_bias, eps, residual=F.linear(x, weight, bias))


def fused_mlp_add_norm_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                                 fc2_bias: Optional[Tensor], residual: Tensor, norm_weight: Optional[Tensor],
                                 norm_bias: Optional[Tensor], eps: float = 1e-5,
                                 pos: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``linear_add_norm_reference`` with the MLP ``fused_mlp_reference(x, ...)`` as the output."""
    return add_pos_layernorm_reference(residual, pos, norm_weight, norm_bias, eps,
                                       residual=fused_mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))


def _check_add_norm(x: Tensor, n: int, residual: Tensor, norm_weight, norm_bias, pos) -> Optional[Tensor]:
    """Checks of the epilogue's arguments (any floating dtypes: the kernel computes in fp32 and
    stores in residual's dtype); returns pos as (P, N) (or None)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected a 3-D (B, L, K) tensor, got shape {tuple(x.shape)}")
    check_tensor("residual", residual, shape=(x.shape[0], x.shape[1], n), floating=True, device=x.device)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, shape=(n,), floating=True, device=x.device)
    if pos is None:
        return None
    if isinstance(pos, Tensor) and pos.dim() != 2:
        if pos.dim() != 3 or pos.shape[0] != 1:
            raise ValueError(f"pos: expected shape (1, P, {n}) or (P, {n}), got {tuple(pos.shape)}")
        pos = pos[0]
    check_tensor("pos", pos, ndim=2, shape=(None, n), floating=True, device=x.device)
    if pos.shape[0] > x.shape[1]:
        raise ValueError(f"pos: expected at most L={x.shape[1]} rows (the last tokens), got {pos.shape[0]}")
    return pos


def _add_norm_call(op: str, x: Tensor, weights: tuple, residual: Tensor, norm_weight, norm_bias, eps: float,
                   pos: Optional[Tensor], backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """Shared body of linear_add_norm (weights: (weight, bias)) and fused_mlp_add_norm (weights:
    (fc1_weight, fc1_bias, fc2_weight, fc2_bias))."""
    mlp = len(weights) == 4
    x, *weights = _autocast_inputs(x, *weights)
    weights = tuple(weights)
    _check_weights(x, weights)
    n = weights[-2].shape[0]
    pos2 = _check_add_norm(x, n, residual, norm_weight, norm_bias, pos)
    ref_fn = fused_mlp_add_norm_reference if mlp else linear_add_norm_reference

    def reference():
        return ref_fn(x, *weights, residual, norm_weight, norm_bias, eps, pos)

    tensors = [t for t in (x, *weights, residual, norm_weight, norm_bias, pos2) if t is not None]
    which = _row_kernel_backend(op, tensors, backend, n, "fc2_weight" if mlp else "weight")
    if which == "reference" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return reference()  # the fused epilogue is an inference path: autograd records the reference ops
    mode = "triton" if backend == "triton" else "auto"
    if torch.compiler.is_compiling():
        lib = _mlp_add_norm_op if mlp else _linear_add_norm_op
        return tuple(lib(x, *weights, residual, norm_weight, norm_bias, pos2, float(eps), mode))
    return _add_norm_run(x, weights, residual, norm_weight, norm_bias, pos2, float(eps), mode, reference)


def _add_norm_kernel(x: Tensor, weights: tuple, residual: Tensor, norm_weight, norm_bias, pos2, eps: float):
    x2 = _rows(x)
    mod = _triton_module()
    if len(weights) == 4:
        xo, y = mod.mlp_forward(x2, *weights, residual, pos2, norm_weight, norm_bias, eps)
    else:
        xo, y = mod.linear_add_norm_forward(x2, *weights, residual, pos2, norm_weight, norm_bias, eps)
    return xo.view(residual.shape), y.view(residual.shape)


def _add_norm_run(x, weights, residual, norm_weight, norm_bias, pos2, eps, backend, reference) -> Tuple[Tensor, Tensor]:
    mlp = len(weights) == 4
    # another way to the same result, timed by "auto" against the first choice: two of our ops
    # (the GEMM on its own tiles, which stay efficient where whole-row programs are too big or too few)
    if mlp:
        w1, b1, w2, b2 = weights
        alternative = ("linear_gelu + linear_add_norm",
                       lambda: linear_add_norm(linear_gelu(x, w1, b1), w2, b2, residual, norm_weight, norm_bias, eps,
                                               pos2))
    else:
        alternative = ("linear + add_pos_layernorm",
                       lambda: add_pos_layernorm(residual, pos2, norm_weight, norm_bias, eps,
                                                 residual=linear(x, weights[0], weights[1])))
    return _dispatch(
        backend, x,
        lambda: ("mlp_add_norm" if mlp else "add_norm", math.prod(x.shape[:-1]), x.shape[-1],
                 *(w.shape[0] for w in weights[::2]), pos2 is not None, x.dtype, x.device.index, _precision_key(x)),
        "fused_mlp_add_norm" if mlp else "linear_add_norm",
        lambda: _add_norm_kernel(x, weights, residual, norm_weight, norm_bias, pos2, eps), reference, alternative)


@torch.library.custom_op("distilpose::linear_add_norm", mutates_args=())
def _linear_add_norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor,
                        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], pos: Optional[Tensor], eps: float,
                        backend: str) -> Tuple[Tensor, Tensor]:
    def reference():
        return linear_add_norm_reference(x, weight, bias, residual, norm_weight, norm_bias, eps, pos)

    if backend != "reference" and not x.is_cuda and not _interpret():
        backend = "reference"
    out = _add_norm_run(x, (weight, bias), residual, norm_weight, norm_bias, pos, eps, backend, reference)
    return tuple(t.contiguous() for t in out)  # the reference follows residual's layout; the op's outputs do not


@torch.library.custom_op("distilpose::fused_mlp_add_norm", mutates_args=())
def _mlp_add_norm_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                     fc2_bias: Optional[Tensor], residual: Tensor, norm_weight: Optional[Tensor],
                     norm_bias: Optional[Tensor], pos: Optional[Tensor], eps: float,
                     backend: str) -> Tuple[Tensor, Tensor]:
    def reference():
        return fused_mlp_add_norm_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, norm_weight,
                                            norm_bias, eps, pos)

    if backend != "reference" and not x.is_cuda and not _interpret():
        backend = "reference"
    out = _add_norm_run(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), residual, norm_weight, norm_bias, pos, eps,
                        backend, reference)
    return tuple(t.contiguous() for t in out)


def _add_norm_outputs(residual: Tensor) -> Tuple[Tensor, Tensor]:
    return tuple(torch.empty(residual.shape, dtype=residual.dtype, device=residual.device) for _ in range(2))


_linear_add_norm_op.register_fake(lambda x, weight, bias, residual, *rest: _add_norm_outputs(residual))
_mlp_add_norm_op.register_fake(lambda x, w1, b1, w2, b2, residual, *rest: _add_norm_outputs(residual))


@annotate("distilpose.linear_add_norm")
def linear_add_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor,
                    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float = 1e-5,
                    pos: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``x_out = residual + x @ weight^T + bias`` (+ ``pos`` on the last P tokens) and
    ``y = LayerNorm(x_out)`` in one kernel (the GEMM's epilogue); x (B, L, K), weight (N, K),
    residual (B, L, N), pos (1, P, N) or (P, N) -> (x_out, y), each (B, L, N). With autograd
    (or on CPU, or N > 512) it runs the reference ops."""
    return _add_norm_call("linear_add_norm", x, (weight, bias), residual, norm_weight, norm_bias, eps, pos, backend)


@annotate("distilpose.fused_mlp_add_norm")
def fused_mlp_add_norm(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                       fc2_bias: Optional[Tensor], residual: Tensor, norm_weight: Optional[Tensor],
                       norm_bias: Optional[Tensor], eps: float = 1e-5, pos: Optional[Tensor] = None,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``linear_add_norm`` with the whole MLP ``fc2(gelu(fc1(x)))`` (``fused_mlp``) as the output
    in the same kernel: the pre-norm layer's second half and the next layer's LayerNorm."""
    return _add_norm_call("fused_mlp_add_norm", x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), residual,
                          norm_weight, norm_bias, eps, pos, backend)
