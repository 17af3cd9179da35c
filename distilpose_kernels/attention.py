"""Token attention for the Token-distilling Encoder: softmax(q k^T * scale) v on a packed qkv.

Public API
- ``token_attention(qkv, num_heads, scale=None, backend=None)``: (N, L, 3C) -> (N, L, C).
- ``token_attention_reference``: the original two-einsum formulation (pure PyTorch).
- ``qkv_attention(x, weight, num_heads, scale=None, bias=None, backend=None)``:
  ``token_attention(F.linear(x, weight, bias), ...)`` with the qkv projection inside the
  attention kernel (inference: no (N, L, 3C) qkv tensor, one launch instead of two);
  ``qkv_attention_reference`` its PyTorch form.
- ``TokenAttention``: drop-in multi-head self-attention module (qkv Linear -> op -> proj).
- ``add_pos_layernorm(x, pos, weight, bias, eps=1e-5, backend=None, residual=None)``: the TDE's
  "sine-full" step fused: x_out = x [+ residual] with ``pos`` (or None) added to its last P
  tokens, y = LayerNorm(x_out); with ``residual`` it is also a pre-norm layer's
  "residual add + LayerNorm".

Backends: "auto"/None picks the Triton kernels for CUDA tensors when Triton is installed
(and DISTILPOSE_FORCE_REFERENCE is unset), else the reference; "triton" forces the kernels
(CPU tensors need TRITON_INTERPRET=1); "reference" forces PyTorch.

The Triton path goes through ``torch.library`` custom ops (namespace ``distilpose``) with
fake kernels and registered autograd, so ``torch.compile(fullgraph=True)`` traces through:
- ``distilpose::token_attention_fwd(qkv, num_heads, scale) -> (out, lse)``
- ``distilpose::token_attention_bwd(dout, dlse?, qkv, out, lse, num_heads, scale) -> dqkv``
- ``distilpose::add_pos_layernorm_fwd(x, pos?, weight?, bias?, eps, residual?) -> (x_out, y, mean, rstd)``
- ``distilpose::add_pos_layernorm_bwd(dx_out?, dy, x_out, weight?, mean, rstd) -> (dx, dw, db)``

NaN policy: no input scan (it would cost a full read); NaN/inf in the inputs propagate to
the outputs of the rows/heads they touch, as in ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import (agrees_at_dtype, annotate, check_same_device, check_tensor, fp32_dot_precision, lazy_module,
                     select_triton_backend, timed_choice)

#: dtypes the Triton kernels accept (the reference accepts any floating dtype).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest head dim the Triton kernels accept (BLOCK_D = next power of two, at most 256).
TRITON_MAX_HEAD_DIM = 256


#: the Triton kernels module (imports triton: loaded only on the Triton path)
_triton_module = lazy_module("distilpose_kernels.attention_triton")


# ============================================================================ checks


def _check_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[int, int]:
    check_tensor("qkv", qkv, ndim=3, floating=True)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    three_c = qkv.shape[-1]
    if three_c % 3 != 0:
        raise ValueError(f"qkv: last dim must be 3*C (q, k, v packed), got {three_c}")
    c = three_c // 3
    if c % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the width C={c} of q/k/v")
    return c, c // num_heads


def _resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale as a float: ``head_dim ** -0.5`` by default (1.0 for an empty head dim,
    where the output is empty whatever the scale)."""
    if scale is None:
        return float(head_dim) ** -0.5 if head_dim > 0 else 1.0
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {scale!r}")
    return float(scale)


def _triton_supports(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when the Triton kernels accept this input, else the reason."""
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32, float16 or bfloat16)"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {head_dim} (the Triton kernels take at most {TRITON_MAX_HEAD_DIM})"
    return None


# ============================================================================ reference


def token_attention_reference(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch reference (the original einsum formulation).

    qkv: (N, L, 3*C) packed [q | k | v], head h in columns h*D:(h+1)*D of each.
    Returns (N, L, C) with heads merged.
    """
    c, d = _check_qkv(qkv, num_heads)
    n, l, _ = qkv.shape
    scale = _resolve_scale(scale, d)
    q, k, v = qkv.reshape(n, l, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    attn = attn.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    return out.transpose(1, 2).reshape(n, l, c)


# ============================================================================ custom ops (Triton path)


@torch.library.custom_op("distilpose::token_attention_fwd", mutates_args=())
def _token_attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (N, L, C), lse (N, H, L) float32, natural log)."""
    return _triton_module().attention_forward(qkv, num_heads, scale)


@_token_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    n, l, three_c = qkv.shape
    out = qkv.new_empty((n, l, three_c // 3))
    lse = qkv.new_empty((n, num_heads, l), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("distilpose::token_attention_bwd", mutates_args=())
def _token_attention_bwd(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """Fused backward, recomputing the probabilities from lse: dqkv (N, L, 3C) packed like qkv."""
    return _triton_module().attention_backward(dout, dlse, qkv, out, lse, num_heads, scale)


@_token_attention_bwd.register_fake
def _(dout, dlse, qkv, out, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _attn_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale


def _attn_grads(ctx, dout, dlse, bwd):
    qkv, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dqkv = bwd(dout.to(qkv.dtype), dlse, qkv, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, None, None


def _attn_backward(ctx, dout, dlse):
    return _attn_grads(ctx, dout, dlse, _token_attention_bwd)


_token_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


class _TokenAttentionFunction(torch.autograd.Function):
    """Eager path: the same kernels as the custom ops without the torch.library dispatch
    (tens of microseconds of Python per call, more than the kernels take at the TDE's size).
    ``torch.compile`` traces the custom ops instead (see ``token_attention``)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        out, lse = _triton_module().attention_forward(qkv, num_heads, scale)
        _attn_setup_context(ctx, (qkv, num_heads, scale), (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _attn_grads(ctx, dout, None, _triton_module().attention_backward)


# ============================================================================ public op


@annotate("distilpose.token_attention")
def token_attention(
    qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over a packed qkv, heads merged.

    qkv: (N, L, 3*C) [q | k | v] as the qkv Linear produces it (any strides), C = num_heads * D.
    scale: default D ** -0.5. backend: None/"auto", "triton" or "reference".
    Returns (N, L, C) in qkv's dtype (fp32 accumulation inside the kernels). Under autocast
    qkv (unless float64) is first cast to the autocast dtype, as the reference's einsums are.
    """
    c, d = _check_qkv(qkv, num_heads)
    scale = _resolve_scale(scale, d)
    if torch.is_autocast_enabled(qkv.device.type) and qkv.dtype != torch.float64:
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    which = select_triton_backend("token_attention", (qkv,), backend)
    if which == "triton":
        why = _triton_supports(qkv.dtype, d)
        if why is not None:
            if backend == "triton":
                raise TypeError(f"qkv: backend='triton' does not support {why}; use backend='reference'")
            which = "reference"
    if which == "reference":
        return token_attention_reference(qkv, num_heads, scale)
    if torch.compiler.is_compiling():
        return _token_attention_fwd(qkv, num_heads, scale)[0]
    return _TokenAttentionFunction.apply(qkv, num_heads, scale)


# ============================================================================ qkv projection + attention


def _check_qkv_attention(x, weight, bias, num_heads) -> Tuple[int, int]:
    check_tensor("x", x, ndim=3, floating=True)
    c = x.shape[-1]
    check_tensor("weight", weight, shape=(3 * c, c), floating=True)
    if bias is not None:
        check_tensor("bias", bias, shape=(3 * c,), floating=True)
    check_same_device(x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if c % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the width C={c} of x")
    return c, c // num_heads


def qkv_attention_reference(x: torch.Tensor, weight: torch.Tensor, num_heads: int, scale: Optional[float] = None,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``token_attention_reference(F.linear(x, weight, bias), num_heads, scale)``."""
    _check_qkv_attention(x, weight, bias, num_heads)
    return token_attention_reference(F.linear(x, weight, bias), num_heads, scale)


@torch.library.custom_op("distilpose::qkv_attention_fwd", mutates_args=())
def _qkv_attention_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                       scale: float) -> torch.Tensor:
    """The fused forward (no autograd: ``qkv_attention`` runs the two ops when a gradient is needed)."""
    return _triton_module().qkv_attention_forward(x, weight, bias, num_heads, scale)


@_qkv_attention_fwd.register_fake
def _(x, weight, bias, num_heads, scale):
    return x.new_empty(x.shape)


#: largest head dim of the fused qkv + attention kernel (its tiles hold q, k, v and the
#: accumulator of a head in registers; checked for spills at 24); wider heads run the two ops
QKV_ATTENTION_MAX_HEAD_DIM = 64
#: "auto" decisions of qkv_attention (timed_choice cache)
_QKV_CHOICES: dict = {}


def _qkv_two_ops(x, weight, bias, num_heads, scale, backend):
    from .mlp import linear  # the library's GEMM op (its own "auto": Triton or cuBLAS)

    qkv = linear(x, weight, bias, backend=backend) if backend != "reference" else F.linear(x, weight, bias)
    return token_attention(qkv, num_heads, scale, backend=backend)


@annotate("distilpose.qkv_attention")
def qkv_attention(
    x: torch.Tensor, weight: torch.Tensor, num_heads: int, scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None, backend: Optional[str] = None,
) -> torch.Tensor:
    """``token_attention(F.linear(x, weight, bias), num_heads, scale)``: the qkv projection and
    the attention in one kernel, for inference.

    x: (N, L, C) any strides; weight (3C, C) and bias (3C,) or None: a qkv ``nn.Linear``'s
    parameters; C = num_heads * D; scale default D ** -0.5. Returns (N, L, C) in x's dtype.
    Each program of the kernel makes its head's q for its query rows and k, v for every key
    block from x: no (N, L, 3C) tensor is written and read back, and the projection is no
    launch of its own, for k / v recomputed once per query block (FLOPs on the tensor cores;
    what pays at batch 1). The kernel has no backward: when a gradient is needed (grad mode on
    and x, weight or bias requiring it) the two ops run (``linear``, then ``token_attention``).
    backend: None/"auto": on CUDA the kernel where it was timed faster than the two ops (once
    per shape, dtype and dot precision; ``auto_choices`` records it), else the two ops; under
    ``torch.compile`` (nothing is timed while tracing) the two ops; "triton": the kernel (CPU
    tensors under TRITON_INTERPRET=1), or for head dims over ``QKV_ATTENTION_MAX_HEAD_DIM`` the
    two ops on their Triton kernels; "reference": ``qkv_attention_reference``. Under autocast
    x, weight and bias (unless float64) are first cast to the autocast dtype, as F.linear is.
    """
    c, d = _check_qkv_attention(x, weight, bias, num_heads)
    scale = _resolve_scale(scale, d)
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    which = select_triton_backend("qkv_attention", (x, weight), backend)
    if which == "reference":
        return qkv_attention_reference(x, weight, num_heads, scale, bias)
    why = _triton_supports(x.dtype, d)  # the Triton kernels' limits (token_attention's too)
    if why is None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        why = f"weight / bias of dtype {weight.dtype} with x of dtype {x.dtype}"
    if backend == "triton" and why is not None:
        raise TypeError(f"x: backend='triton' does not support {why}; use backend='reference'")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    # the fused kernel's own limit (wider heads: the two ops, on Triton for backend="triton"); and
    # "auto" under torch.compile, where nothing can be timed
    if (why is not None or needs_grad or d > QKV_ATTENTION_MAX_HEAD_DIM
            or (backend in (None, "auto") and torch.compiler.is_compiling())):
        return _qkv_two_ops(x, weight, bias, num_heads, scale, backend)

    def fused():
        if torch.compiler.is_compiling():
            return _qkv_attention_fwd(x, weight, bias, num_heads, scale)
        return _triton_module().qkv_attention_forward(x, weight, bias, num_heads, scale)

    if backend in (None, "auto") and x.numel() > 0:  # (nothing to time or compare when empty)
        precision = fp32_dot_precision(x.device) if x.dtype == torch.float32 else "16bit"
        key = ("qkv_attention", tuple(x.shape), num_heads, x.dtype, bias is None, x.device.index, precision)
        tol32 = 1e-3 if precision == "tf32" else 1e-5
        if not timed_choice(_QKV_CHOICES, key, fused,
                            lambda: _qkv_two_ops(x, weight, bias, num_heads, scale, None),
                            lambda a, b: agrees_at_dtype(a, b, 2e-2, tol32),
                            "qkv_attention: the fused projection + attention kernel"):
            return _qkv_two_ops(x, weight, bias, num_heads, scale, backend)
    return fused()


class TokenAttention(nn.Module):
    """Drop-in multi-head self-attention on tokens: qkv Linear -> token_attention -> proj Linear.

    x: (N, L, dim) -> (N, L, dim). Parameter names (``qkv``, ``proj``) match the TDE's
    attention block and timm's ViT ``Attention``, so state dicts load into either.
    No attention-probability dropout (the fused kernel never materialises the probabilities);
    ``proj_drop`` applies to the output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        scale: Optional[float] = None,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide dim {dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else float(scale)
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim}, got shape {tuple(x.shape)}")
        if x.device != self.qkv.weight.device:
            raise ValueError(f"x: expected a tensor on {self.qkv.weight.device} (the module's device), got {x.device}")
        out = token_attention(self.qkv(x), self.num_heads, self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


# ============================================================================ add position + LayerNorm


def _check_apln(x, pos, weight, bias, residual=None) -> Tuple[int, int, int, int]:
    check_tensor("x", x, ndim=3, floating=True)
    n, l, c = x.shape
    tensors = {"x": x}
    p = 0
    if pos is not None:
        check_tensor("pos", pos, floating=True)
        if pos.dim() == 3:
            if pos.shape[0] != 1:
                raise ValueError(f"pos: expected (P, C) or (1, P, C), got {tuple(pos.shape)}")
        elif pos.dim() != 2:
            raise ValueError(f"pos: expected (P, C) or (1, P, C), got {tuple(pos.shape)}")
        p = pos.shape[-2]
        if pos.shape[-1] != c or p > l:
            raise ValueError(f"pos: expected (P, {c}) with P <= L={l}, got {tuple(pos.shape)}")
        tensors["pos"] = pos
    if residual is not None:
        check_tensor("residual", residual, shape=(n, l, c), floating=True)
        tensors["residual"] = residual
    if weight is not None:
        check_tensor("weight", weight, shape=(c,), floating=True)
        tensors["weight"] = weight
    if bias is not None:
        check_tensor("bias", bias, shape=(c,), floating=True)
        tensors["bias"] = bias
    check_same_device(**tensors)
    return n, l, c, p


def add_pos_layernorm_reference(
    x: torch.Tensor,
    pos: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch: x_out = x [+ residual], then pos added to its last P tokens
    (cat(x[:, :L-P], x[:, L-P:] + pos)), in x's dtype; y = LayerNorm(x_out)."""
    n, l, c, p = _check_apln(x, pos, weight, bias, residual)
    out = x if residual is None else x + residual
    if pos is not None:
        k = l - p
        out = torch.cat((out[:, :k], out[:, k:] + pos.reshape(1, p, c)), dim=1)
    out = out.to(x.dtype)  # x_out in x's dtype (the sums in the promoted dtype), as the kernels
    # LayerNorm parameters of another dtype (the kernels take any): F.layer_norm takes x's dtype,
    # or float32 ones with a 16-bit x; the cast is exact where the kernels' is
    pdt = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
    weight, bias = (t.to(pdt) if t is not None and t.dtype not in (out.dtype, pdt) else t for t in (weight, bias))
    # y in x's dtype (under CUDA autocast layer_norm would return float32)
    return out, F.layer_norm(out, (c,), weight, bias, eps).to(out.dtype)


@torch.library.custom_op("distilpose::add_pos_layernorm_fwd", mutates_args=())
def _apln_fwd(
    x: torch.Tensor, pos: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, residual: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_out, y, mean (N*L,) fp32, rstd (N*L,) fp32)."""
    return _triton_module().add_pos_layernorm_forward(x, pos, weight, bias, eps, residual)


@_apln_fwd.register_fake
def _(x, pos, weight, bias, eps, residual=None):
    n, l, c = x.shape
    stat = x.new_empty((n * l,), dtype=torch.float32)
    return x.new_empty((n, l, c)), x.new_empty((n, l, c)), stat, stat.new_empty((n * l,))


@torch.library.custom_op("distilpose::add_pos_layernorm_bwd", mutates_args=())
def _apln_bwd(
    dx_out: Optional[torch.Tensor],
    dy: torch.Tensor,
    x_out: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, L, C), dweight (C,) fp32, dbias (C,) fp32)."""
    return _triton_module().add_pos_layernorm_backward(dx_out, dy, x_out, weight, mean, rstd)


@_apln_bwd.register_fake
def _(dx_out, dy, x_out, weight, mean, rstd):
    c = x_out.shape[-1]
    return x_out.new_empty(x_out.shape), x_out.new_empty((c,), dtype=torch.float32), x_out.new_empty((c,), dtype=torch.float32)


def _apln_save(ctx, pos, weight, bias, x_out, mean, rstd, residual=None) -> None:
    ctx.save_for_backward(x_out, weight, mean, rstd)
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = None if pos is None else pos.dtype
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _apln_setup_context(ctx, inputs, output):
    x, pos, weight, bias, eps = inputs[:5]
    x_out, y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    _apln_save(ctx, pos, weight, bias, x_out, mean, rstd, inputs[5] if len(inputs) > 5 else None)


def _apln_grads(ctx, dx_out, dy, bwd):
    x_out, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x_out)
    dx, dw, db = bwd(dx_out, dy, x_out, weight, mean, rstd)
    dpos = None
    if ctx.pos_shape is not None and ctx.needs_input_grad[1]:
        p = ctx.pos_shape[-2]
        dpos = dx[:, x_out.shape[1] - p:].sum(0, dtype=torch.float32).reshape(ctx.pos_shape).to(ctx.pos_dtype)
    dweight = dw.to(ctx.weight_dtype) if ctx.has_weight and ctx.needs_input_grad[2] else None
    dbias = db.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
    # x_out = x + residual (+ pos): the residual's gradient is x's
    dres = dx.to(ctx.res_dtype) if len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5] else None
    return dx, dpos, dweight, dbias, None, dres


def _apln_backward(ctx, dx_out, dy, dmean, drstd):
    return _apln_grads(ctx, dx_out, dy, _apln_bwd)


_apln_fwd.register_autograd(_apln_backward, setup_context=_apln_setup_context)


class _AddPosLayerNormFunction(torch.autograd.Function):
    """Eager path: the custom ops' kernels without the torch.library dispatch (which costs far
    more host time per call than the kernel takes at the TDE's size)."""

    @staticmethod
    def forward(ctx, x, pos, weight, bias, eps, residual):
        ctx.set_materialize_grads(False)
        x_out, y, mean, rstd = _triton_module().add_pos_layernorm_forward(x, pos, weight, bias, eps, residual)
        _apln_save(ctx, pos, weight, bias, x_out, mean, rstd, residual)
        return x_out, y

    @staticmethod
    def backward(ctx, dx_out, dy):
        return _apln_grads(ctx, dx_out, dy, _triton_module().add_pos_layernorm_backward)


@annotate("distilpose.add_pos_layernorm")
def add_pos_layernorm(
    x: torch.Tensor,
    pos: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused "residual add, add position table to the trailing tokens, then LayerNorm".

    x: (N, L, C); residual: (N, L, C) of any float dtype or None, added to every token; pos: (P, C)
    or (1, P, C) with P <= L, or None, added to tokens L-P..L-1 (the visual tokens after the
    K = L-P keypoint tokens); weight, bias: (C,) or None.
    Returns (x_out (N, L, C): the residual stream x + residual + pos, rounded once to x's
    dtype, y = LayerNorm(x_out)), both in x's dtype; statistics in float32. Gradients flow to
    x, residual, pos, weight and bias. A pre-norm transformer layer's
    ``x = x + f(h); h2 = norm(x)`` is ``x, h2 = add_pos_layernorm(x, None, w, b, residual=f(h))``.
    """
    _check_apln(x, pos, weight, bias, residual)
    tensors = [t for t in (x, pos, weight, bias, residual) if t is not None]
    which = select_triton_backend("add_pos_layernorm", tensors, backend, TRITON_DTYPES)
    if which == "reference":
        return add_pos_layernorm_reference(x, pos, weight, bias, eps, residual)
    if torch.compiler.is_compiling():
        x_out, y, _, _ = _apln_fwd(x, pos, weight, bias, float(eps), residual)
        return x_out, y
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _AddPosLayerNormFunction.apply(x, pos, weight, bias, float(eps), residual)
    x_out, y, _, _ = _triton_module().add_pos_layernorm_forward(x, pos, weight, bias, float(eps), residual)
    return x_out, y
