"""Token attention for the Token-distilling Encoder: softmax(q k^T * scale) v on a packed qkv.

(Foundation: pure-PyTorch reference only; the fused Triton path lands with the attention issue.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import annotate, check_tensor


def _check_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[int, int]:
    check_tensor("qkv", qkv, ndim=3, floating=True)
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    three_c = qkv.shape[-1]
    if three_c % 3 != 0:
        raise ValueError(f"qkv: last dim must be 3*C (q, k, v packed), got {three_c}")
    c = three_c // 3
    if c % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the width C={c} of q/k/v")
    return c, c // num_heads


def token_attention_reference(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch reference (the original einsum formulation).

    qkv: (N, L, 3*C) packed [q | k | v], head h in columns h*D:(h+1)*D of each.
    Returns (N, L, C) with heads merged.
    """
    c, d = _check_qkv(qkv, num_heads)
    n, l, _ = qkv.shape
    scale = d ** -0.5 if scale is None else scale
    q, k, v = qkv.view(n, l, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    attn = attn.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    return out.transpose(1, 2).reshape(n, l, c)


@annotate("distilpose.token_attention")
def token_attention(
    qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over a packed qkv (N, L, 3*C) -> (N, L, C)."""
    if backend not in (None, "auto", "reference"):
        raise ValueError(f"token_attention: backend {backend!r} is not available yet")
    return token_attention_reference(qkv, num_heads, scale)
