"""Convolution with its epilogue fused: ``relu(conv2d(x, weight) + bias [+ residual])``.

Every ResNet / HRNet block of an inference model (BatchNorm folded into the conv) ends in
this pattern. Eager PyTorch runs it as up to three kernels (conv with bias, add, ReLU), and
each one reads and writes the full activation again: counted for DistilPose-S's Bottleneck
(64 -> 64 -> 256 channels), those passes are two thirds of its activation traffic, and
fusing them cuts the block's traffic 2.3x. cuDNN fuses the whole epilogue into the convolution
(``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``, the ops behind
TorchScript's frozen-graph conv-add-relu fusion), so the conv's output is written once.

Public API
- ``conv2d_relu(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1,
  groups=1, backend=None)``: x (N, Cin, H, W), weight (Cout, Cin/groups, kh, kw), bias (Cout,),
  residual (N, Cout, Ho, Wo) -> (N, Cout, Ho, Wo) in x's dtype; channels-last when x or weight is.
- ``conv2d_relu_reference``: ``F.conv2d`` + add + ReLU (pure PyTorch).
- ``ConvReLU2d``: an ``nn.Conv2d`` (same parameters and state-dict keys) whose forward is
  ``conv2d_relu(x, weight, bias, residual)``; ``ConvReLU2d.from_conv(conv)`` shares a conv's
  parameters.

Backends: "reference"; "cudnn" (the fused cuDNN op; CUDA tensors only); "triton" (an implicit
GEMM, Cin x kh x kw <= TRITON_MAX_REDUCTION, no groups: the RGB stem convs, where cuDNN has no
tensor-core kernel, and the small-batch block convs; ``conv_epilogue_triton``; CUDA, or the CPU
under TRITON_INTERPRET=1); None/"auto": on CUDA, the fused op where it was measured faster than
the reference and agreed with it, then the Triton kernel where it takes the shape and was
measured faster than that choice, each chosen once per (shapes, layouts, dtype, device, conv
arguments) on the first call outside a CUDA-graph capture; the reference elsewhere, and on
CUDA while that choice is not made yet (capture).
cuDNN's fused kernels are fast for most shapes but much slower for some (pytorch#68506), so
"auto" never trusts them untimed. ``DISTILPOSE_CONV_EPILOGUE_AUTOTUNE=0`` makes "auto" use
the fused op on CUDA without timing or checking. DISTILPOSE_FORCE_REFERENCE=1 makes "auto"
pick the reference.

Autocast: like ``F.conv2d``, every floating input but float64 ones (residual included) is cast
to the autocast dtype first. Autograd: ``torch.ops.distilpose.conv2d_relu`` has a registered backward
(``aten.convolution_backward`` on the masked gradient), so gradients flow on every backend
and ``torch.compile`` traces the op without a graph break.

NaN policy: no input scan. The reference propagates NaN (``relu(NaN) = NaN``); cuDNN's fused
ReLU may turn a NaN pre-activation into 0. "auto" makes its choice only on finite outputs.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import (agrees_at_dtype, annotate, env_switch, force_reference, lazy_module, timed_choice,
                     triton_interpret)

__all__ = ["conv2d_relu", "conv2d_relu_reference", "ConvReLU2d"]

#: 0 turns the timed choice of "auto" off: the fused cuDNN op is then used on CUDA untimed.
AUTOTUNE_ENV = "DISTILPOSE_CONV_EPILOGUE_AUTOTUNE"
AUTOTUNE = env_switch(AUTOTUNE_ENV, True)
#: dtypes the fused cuDNN path accepts (the reference takes any floating dtype)
CUDNN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

IntPair = Union[int, Sequence[int]]

# (shapes, layouts, dtype, device, conv args, cuDNN flags) -> True: fused cuDNN op, False: reference
_CHOICE: Dict[tuple, bool] = {}
#: the Triton kernel takes convolutions without groups whose reduction (Cin x kh x kw) is at
#: most this long: the RGB stems (27), where cuDNN has no tensor-core kernel, and the
#: Bottleneck / HRNet block convs (64-576 at batch 1-2, where cuDNN's kernels are latency-bound);
#: "auto" times it against cuDNN per shape
TRITON_MAX_REDUCTION = 2304
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = lazy_module("distilpose_kernels.conv_epilogue_triton")


# ============================================================================ checks


def _pair(name: str, v: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        a, b = v  # type: ignore[misc]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}") from None
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int) or not isinstance(b, int):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if a < minimum or b < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {(a, b)}")
    return a, b


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
           stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int], groups: int
           ) -> Tuple[int, int, int, int]:
    """Validate the arguments; returns the output shape (N, Cout, Ho, Wo)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if cin % groups or cout % groups or cin_g * groups != cin:
        raise ValueError(f"weight: expected shape (Cout, {cin // groups if cin % groups == 0 else '?'}, kh, kw) "
                         f"for x with {cin} channels and groups={groups} (Cout divisible by groups), "
                         f"got {tuple(weight.shape)}")
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x: spatial size {(h, w)} is smaller than the (dilated, padded) kernel {(kh, kw)}")
    others = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (cout,):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias: expected shape ({cout},), got {got}")
        others.append(("bias", bias))
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != (n, cout, ho, wo):
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"residual: expected the output's shape {(n, cout, ho, wo)}, got {got}")
        others.append(("residual", residual))
    for name, t in others:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (like x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got one on {t.device}")
    return n, cout, ho, wo


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _out_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The output layout on every backend (and in the fake kernel): channels-last when x or
    weight is, as cuDNN and oneDNN choose."""
    return torch.channels_last if (_channels_last(x) or _channels_last(weight)) else torch.contiguous_format


# ============================================================================ implementations


def conv2d_relu_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
    stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
) -> Tensor:
    """``relu(F.conv2d(x, weight, bias, ...) + residual)``, pure PyTorch (differentiable).

    Without autograd the add and the ReLU run in place on the conv's output (no extra buffers)
    where that gives the same result (a residual of the output's shape and dtype).
    """
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    tracked = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))
    if tracked:
        if residual is not None:
            out = out + residual
        return torch.relu(out)
    if residual is not None:
        if residual.dtype == out.dtype and residual.shape == out.shape:
            out.add_(residual)
        else:  # type promotion or broadcasting: as the tracked path (a fresh tensor)
            out = out + residual
    return out.relu_()


def _cudnn(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
           stride: List[int], padding: List[int], dilation: List[int], groups: int) -> Tensor:
    if torch.backends.cudnn.benchmark:
        # cuDNN's heuristics plan, not a benchmark of every fused engine: several of those are
        # compiled at run time (seconds each), and "auto" times the plan against the reference
        # anyway
        torch.backends.cudnn.benchmark = False  # only this flag: the others keep the caller's values
        try:
            return _cudnn(x, weight, bias, residual, stride, padding, dilation, groups)
        finally:
            torch.backends.cudnn.benchmark = True
    if bias is not None:
        bias = bias.contiguous()  # a strided bias view: cuDNN's plan cache may not key on its strides
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


def _triton_unsupported(x: Tensor, weight: Tensor, residual: Optional[Tensor], groups: int) -> Optional[str]:
    """Why the Triton kernel cannot run this convolution (None: it can)."""
    if groups != 1:
        return "grouped convolutions"
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype}"
    red = weight.shape[1] * weight.shape[2] * weight.shape[3]
    if red > TRITON_MAX_REDUCTION:
        return f"a reduction Cin*kh*kw = {red} > {TRITON_MAX_REDUCTION}"
    if not (x.is_cuda or (x.device.type == "cpu" and triton_interpret())):
        return f"tensors on {x.device} (CUDA, or the CPU under TRITON_INTERPRET=1)"
    return None


def _triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
            padding: List[int], dilation: List[int]) -> Tensor:
    n, cout = x.shape[0], weight.shape[0]
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return _triton_module().small_conv_relu_forward(x, weight, bias, stride, padding, dilation, (n, cout, ho, wo),
                                                    _out_format(x, weight), residual)


def _agrees(got: Tensor, ref: Tensor) -> bool:
    """Equal up to the rounding of one extra intermediate and the conv algorithm (a missing
    bias, residual or ReLU is far outside)."""
    tf32 = torch.backends.cudnn.allow_tf32
    return agrees_at_dtype(got, ref, 2e-2, 5e-3 if (ref.dtype == torch.float32 and tf32) else 1e-4)


def _choose(key: tuple, fused: Callable[[], Tensor], reference: Callable[[], Tensor]) -> bool:
    """Whether "auto" runs the fused op for ``key`` (``_utils.timed_choice``)."""
    return timed_choice(_CHOICE, key, fused, reference, _agrees, "conv2d_relu: the fused cuDNN op")


def _key(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
         stride, padding, dilation, groups) -> tuple:
    return (tuple(x.shape), _channels_last(x), tuple(weight.shape), _channels_last(weight),
            bias is not None, None if residual is None else _channels_last(residual),
            x.dtype, x.device.index, tuple(stride), tuple(padding), tuple(dilation), groups,
            torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
         stride: List[int], padding: List[int], dilation: List[int], groups: int, backend: str) -> Tensor:
    """The op's computation (no autograd): "reference", "cudnn" or "auto" (CUDA)."""
    fmt = _out_format(x, weight)

    def reference() -> Tensor:
        return conv2d_relu_reference(x, weight, bias, residual, stride, padding, dilation, groups)

    def fused() -> Tensor:
        return _cudnn(x, weight, bias, residual, stride, padding, dilation, groups)

    def triton_path() -> Tensor:
        return _triton(x, weight, bias, residual, stride, padding, dilation)

    if backend == "auto" and x.is_cuda and x.dtype in CUDNN_DTYPES and torch.backends.cudnn.enabled:
        key = _key(x, weight, bias, residual, stride, padding, dilation, groups)
        use_fused = not AUTOTUNE or _choose(key, fused, reference)
        backend = "cudnn" if use_fused else "reference"
        if AUTOTUNE and _triton_unsupported(x, weight, residual, groups) is None and timed_choice(
                _CHOICE, key + ("triton",), triton_path, fused if use_fused else reference, _agrees,
                "conv2d_relu: the Triton small-reduction kernel"):
            backend = "triton"
    if backend == "triton":
        return triton_path()
    out = fused() if backend == "cudnn" else reference()
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


# ============================================================================ torch.library


@torch.library.custom_op("distilpose::conv2d_relu", mutates_args=())
def _conv2d_relu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    backend: str) -> Tensor:
    if backend != "reference" and not x.is_cuda and not (backend == "triton" and triton_interpret()):
        backend = "reference"
    with torch.no_grad():
        return _run(x, weight, bias, residual, stride, padding, dilation, groups, backend)


@_conv2d_relu_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, backend):
    n, cout, ho, wo = _check(x, weight, bias, residual, tuple(stride), tuple(padding), tuple(dilation), groups)
    return x.new_empty((n, cout, ho, wo)).contiguous(memory_format=_out_format(x, weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, _backend = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _backward(ctx, grad: Tensor):
    x, weight, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    g = grad * (out > 0)  # ReLU's gradient, 0 at 0 as torch.relu's
    need = ctx.needs_input_grad
    gx = gw = gb = None
    if need[0] or need[1] or (ctx.has_bias and need[2]):
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [need[0], need[1], ctx.has_bias and need[2]])
    gr = g if (ctx.has_residual and need[3]) else None
    return gx, gw, gb, gr, None, None, None, None, None


_conv2d_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public op


def _resolve_backend(backend: Optional[str], x: Tensor, weight: Tensor, residual: Optional[Tensor],
                     groups: int) -> str:
    backend = "auto" if backend is None else backend
    if backend not in ("auto", "reference", "cudnn", "triton"):
        raise ValueError(f"backend: expected None, 'auto', 'reference', 'cudnn' or 'triton', got {backend!r}")
    if backend == "cudnn":
        if not x.is_cuda:
            raise RuntimeError(f"conv2d_relu: backend='cudnn' needs CUDA tensors, x is on {x.device}")
        if x.dtype not in CUDNN_DTYPES:
            raise TypeError(f"x: backend='cudnn' supports {[str(d) for d in CUDNN_DTYPES]}, got {x.dtype}")
        return backend
    if backend == "triton":
        why = _triton_unsupported(x, weight, residual, groups)
        if why is not None:
            raise ValueError(f"conv2d_relu: backend='triton' does not take {why}")
        return backend
    if backend == "auto" and (force_reference() or not x.is_cuda):
        return "reference"
    return backend


def conv2d_relu(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
    stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
    backend: Optional[str] = None,
) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)``.

    x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw); bias: (Cout,) or None;
    residual: (N, Cout, Ho, Wo) or None. All in one floating dtype on one device (after the
    autocast cast). Returns (N, Cout, Ho, Wo), channels-last when x or weight is.
    backend: None/"auto", "reference", "cudnn" or "triton" (see the module docstring).
    """
    st = _pair("stride", stride, 1)
    pad = _pair("padding", padding, 0)
    dil = _pair("dilation", dilation, 1)
    return _conv2d_relu(x, weight, bias, residual, st, pad, dil, groups, backend)


@annotate("distilpose.conv2d_relu")
def _conv2d_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                 st: Tuple[int, int], pad: Tuple[int, int], dil: Tuple[int, int], groups: int,
                 backend: Optional[str]) -> Tensor:
    """conv2d_relu after the conv arguments were normalised to int pairs."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, residual = (  # autocast leaves float64 alone (as F.conv2d)
            t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, bias, residual))
    _check(x, weight, bias, residual, st, pad, dil, groups)
    which = _resolve_backend(backend, x, weight, residual, groups)
    if which == "reference":
        return conv2d_relu_reference(x, weight, bias, residual, st, pad, dil, groups)
    tracked = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))
    if tracked or torch.compiler.is_compiling():
        return _conv2d_relu_op(x, weight, bias, residual, list(st), list(pad), list(dil), groups, which)
    return _run(x, weight, bias, residual, list(st), list(pad), list(dil), groups, which)


class ConvReLU2d(nn.Conv2d):
    """``nn.Conv2d`` with the bias, an optional residual and the ReLU fused in:
    ``forward(x, residual=None) = relu(conv(x) + bias + residual)`` via :func:`conv2d_relu`.

    Same parameters, state-dict keys and constructor as ``nn.Conv2d`` (``padding_mode``
    "zeros" and integer padding only). ``backend`` as for ``conv2d_relu``.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"ConvReLU2d: needs padding_mode='zeros' and integer padding, got "
                             f"padding_mode={self.padding_mode!r}, padding={self.padding!r}")
        self.backend = backend

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, backend: Optional[str] = None) -> "ConvReLU2d":
        """A ConvReLU2d that shares ``conv``'s weight and bias (no copy)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device="meta", backend=backend)
        m.weight = conv.weight
        if conv.bias is not None:
            m.bias = conv.bias
        m.train(conv.training)
        return m

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        # nn.Conv2d validated and stored its arguments as int pairs
        return _conv2d_relu(x, self.weight, self.bias, residual, self.stride, self.padding,  # type: ignore[arg-type]
                            self.dilation, self.groups, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", relu=True" + (f", backend={self.backend!r}" if self.backend else "")
