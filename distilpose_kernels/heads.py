"""The regression head of DistilPose's student in one kernel: LayerNorm -> Linear(D, 5) ->
sigmoid (x, y), identity (score), softplus (sigma_x, sigma_y), per keypoint token.

As PyTorch ops that is a LayerNorm, a GEMM with 5 output columns (cuBLAS picked a split-K
"largek" kernel for it, 9.3 us in the H200 batch-1 graph, plus a bias epilogue kernel), and the
two activations: five kernels on 34 rows at batch 1 with the flip test. This op is one.

Public API
- ``regression_head(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps=1e-5, backend=None)``:
  tokens (..., D) any float dtype and strides, norm_weight / norm_bias (D,), fc_weight (5, D),
  fc_bias (5,) -> (..., 5) float32 [sigmoid(x), sigmoid(y), score, softplus(sx), softplus(sy)].
- ``regression_head_reference``: the same as PyTorch ops (in float32).

Backends: "reference"; "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1); None/"auto": the
kernel on CUDA, the reference elsewhere (DISTILPOSE_FORCE_REFERENCE=1 forces it). No gradient:
with autograd (an input requiring grad) the reference runs. Registered as
``torch.ops.distilpose.regression_head`` (fake kernel: ``torch.compile`` traces it). NaN in a
token propagates to that token's outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import annotate, check_tensor, lazy_module, select_triton_backend, triton_interpret

__all__ = ["regression_head", "regression_head_reference"]

_triton_module = lazy_module("distilpose_kernels.heads_triton")
#: "auto" runs the kernel for token widths up to this (DistilPose: 192); the reference beyond
MAX_KERNEL_DIM = 2048


def regression_head_reference(tokens: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc_weight: Tensor,
                              fc_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """PyTorch ops, float32 (differentiable): (..., D) -> (..., 5) activated."""
    h = F.layer_norm(tokens.float(), (tokens.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    out = F.linear(h, fc_weight.float(), fc_bias.float())
    return torch.cat((out[..., 0:2].sigmoid(), out[..., 2:3], F.softplus(out[..., 3:5])), dim=-1)


def _check(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps) -> None:
    check_tensor("tokens", tokens, floating=True)
    if tokens.dim() < 1:
        raise ValueError("tokens: expected (..., D), got a 0-D tensor")
    d = tokens.shape[-1]
    dev = tokens.device
    check_tensor("norm_weight", norm_weight, shape=(d,), floating=True, device=dev)
    check_tensor("norm_bias", norm_bias, shape=(d,), floating=True, device=dev)
    check_tensor("fc_weight", fc_weight, shape=(5, d), floating=True, device=dev)
    check_tensor("fc_bias", fc_bias, shape=(5,), floating=True, device=dev)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps: expected a positive float, got {eps!r}")


def _kernel(tokens: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc_weight: Tensor, fc_bias: Tensor,
            eps: float) -> Tensor:
    # (B, K, D): the keypoint tokens are usually a slice of the (N, K + P, D) stream, which a
    # flattening to rows would copy; the kernel reads them through their strides
    x = tokens.reshape(-1, *tokens.shape[-2:]) if tokens.dim() >= 2 else tokens.reshape(1, 1, -1)
    out = _triton_module().regression_head(x, norm_weight.contiguous(), norm_bias.contiguous(),
                                           fc_weight, fc_bias.contiguous(), eps)
    return out.view(*tokens.shape[:-1], 5)


@torch.library.custom_op("distilpose::regression_head", mutates_args=())
def _op(tokens: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc_weight: Tensor, fc_bias: Tensor,
        eps: float) -> Tensor:
    if tokens.is_cuda or triton_interpret():
        return _kernel(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps)
    return regression_head_reference(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps)


@_op.register_fake
def _(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps):
    return tokens.new_empty((*tokens.shape[:-1], 5), dtype=torch.float32)


@annotate("distilpose.regression_head")
def regression_head(tokens: Tensor, norm_weight: Tensor, norm_bias: Tensor, fc_weight: Tensor, fc_bias: Tensor,
                    eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """(..., D) keypoint tokens -> (..., 5) float32 [sigmoid x, sigmoid y, score, softplus sx,
    softplus sy] in one kernel (module docstring)."""
    _check(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps)
    tensors = (tokens, norm_weight, norm_bias, fc_weight, fc_bias)
    which = select_triton_backend("regression_head", tensors, backend)
    if backend in (None, "auto") and tokens.shape[-1] > MAX_KERNEL_DIM:
        which = "reference"  # one program holds BLOCK_R whole rows: wider tokens would spill
    if which == "reference" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return regression_head_reference(tokens, norm_weight, norm_bias, fc_weight, fc_bias, eps)
    if torch.compiler.is_compiling():
        return _op(tokens, norm_weight, norm_bias, fc_weight, fc_bias, float(eps))
    return _kernel(tokens, norm_weight, norm_bias, fc_weight, fc_bias, float(eps))
