"""Complexity report: parameters and multiply-accumulates (MACs).

The paper's convention counts conv and linear multiply-adds only, leaving out the
attention matrix products (q k^T and attn v); ``full`` adds those products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from .presets import count_parameters
from .tde import TokenAttentionBlock, TokenDistillingEncoder


@dataclass
class Complexity:
    name: str
    params: int
    gmacs_paper: float  # conv + linear
    gmacs_full: float  # + attention products
    #: elements of every conv / linear / attention output of one image: a layer-wise traffic
    #: floor is each of them written once and read once (2 * elements * element size bytes)
    act_melems: float = 0.0

    def row(self) -> str:
        return f"{self.name:<20} {self.params:>12,} {self.params / 1e6:>8.2f}M {self.gmacs_paper:>8.2f} {self.gmacs_full:>8.2f}"


HEADER = f"{'model':<20} {'params':>12} {'':>9} {'GMACs':>8} {'full':>8}"


@torch.no_grad()
def measure_complexity(model: nn.Module, input_size: Optional[Tuple[int, int]] = None, name: str = "") -> Complexity:
    """Count MACs of one (1, 3, H, W) forward with hooks on Conv2d, Linear and the attention."""
    input_size = input_size or getattr(model, "input_size", (256, 192))
    counts = {"conv_linear": 0, "attn": 0, "act": 0}
    hooks: List[torch.utils.hooks.RemovableHandle] = []

    def conv_hook(m: nn.Conv2d, inp, out):
        counts["conv_linear"] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        counts["act"] += out.numel()

    def linear_hook(m: nn.Linear, inp, out):
        counts["conv_linear"] += out.numel() * m.in_features
        counts["act"] += out.numel()

    def attn_hook(m: TokenAttentionBlock, inp, out):
        n, l, c = out.shape
        counts["attn"] += 2 * n * l * l * c  # q k^T and attn v over all heads
        counts["act"] += out.numel()  # the attention output itself (qkv / proj are Linear hooks)

    def tde_hook(m: TokenDistillingEncoder, inp, out):
        # the patch embedding: a Linear on patch vectors, run as a strided conv (embed_patches)
        counts["conv_linear"] += out[1].numel() * m.patch_embed.in_features
        counts["act"] += out[1].numel()

    for m in model.modules():
        if isinstance(m, TokenDistillingEncoder):
            hooks.append(m.register_forward_hook(tde_hook))
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, TokenAttentionBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, 3, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    paper = counts["conv_linear"] / 1e9
    return Complexity(name or getattr(model, "name", type(model).__name__), count_parameters(model), paper,
                      paper + counts["attn"] / 1e9, counts["act"] / 1e6)
