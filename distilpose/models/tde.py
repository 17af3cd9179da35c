"""Token-distilling Encoder (TDE): patch tokens + keypoint tokens through a pre-norm transformer."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import annotate

POS_MODES = ("sine-full", "sine", "none")


def sine_position_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style 2-D sine table (1, grid_h*grid_w, dim): dim/2 y-features then dim/2 x-features."""
    if dim % 4 != 0:
        raise ValueError(f"dim: the sine table needs a multiple of 4, got {dim}")
    half = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, grid_h + 1, dtype=torch.float64).view(grid_h, 1).expand(grid_h, grid_w)
    x = torch.arange(1, grid_w + 1, dtype=torch.float64).view(1, grid_w).expand(grid_h, grid_w)
    y = y / (grid_h + eps) * scale
    x = x / (grid_w + eps) * scale
    i = torch.arange(half, dtype=torch.float64)
    t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)

    def feats(c: torch.Tensor) -> torch.Tensor:
        p = c[..., None] / t  # (gh, gw, half)
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    table = torch.cat((feats(y), feats(x)), dim=-1)  # (gh, gw, dim)
    return table.reshape(1, grid_h * grid_w, dim).float()


def _linear(layer: nn.Linear, x: torch.Tensor, triton: bool) -> torch.Tensor:
    """``layer(x)``, or the same Linear through ``distilpose_kernels.linear`` (the Triton GEMM where
    it was timed faster than cuBLAS: fp32 3xTF32 tensor cores; cuBLAS elsewhere)."""
    return dk.linear(x, layer.weight, layer.bias) if triton else layer(x)


class TokenAttentionBlock(nn.Module):
    """Multi-head self-attention on (N, L, C): qkv Linear (no bias) -> token_attention -> proj.
    ``triton_linears``: qkv and proj through ``distilpose_kernels.linear``; ``fuse_qkv``: the qkv
    projection inside the attention kernel (``distilpose_kernels.qkv_attention``, used on CUDA
    where it is timed faster than the two ops). Both set by InferenceEngine; same math."""

    triton_linears = False
    fuse_qkv = False

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide dim {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``token_attention(qkv(x))``, before the output projection."""
        if self.fuse_qkv:
            return dk.qkv_attention(x, self.qkv.weight, self.num_heads, self.scale, bias=self.qkv.bias,
                                    backend=self.backend)
        return dk.token_attention(_linear(self.qkv, x, self.triton_linears), self.num_heads, self.scale,
                                  backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.proj, self.attend(x), self.triton_linears)


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2. ``fuse_gelu``: fc1's bias and the GELU run in the GEMM's
    epilogue (``distilpose_kernels.linear_gelu``); ``triton_linears``: fc1 and fc2 through
    ``distilpose_kernels.linear``; ``mlp_kernel`` (first): the whole MLP as one
    ``distilpose_kernels.fused_mlp`` (the hidden activation never written). Same math; all set
    by InferenceEngine."""

    fuse_gelu = False
    triton_linears = False
    mlp_kernel = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_kernel:
            return dk.fused_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        tl = self.triton_linears
        if self.fuse_gelu:
            return _linear(self.fc2, dk.linear_gelu(x, self.fc1.weight, self.fc1.bias), tl)
        return _linear(self.fc2, self.act(_linear(self.fc1, x, tl)), tl)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attention_backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = TokenAttentionBlock(dim, num_heads, attention_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_dim)

    @annotate("distilpose.tde.layer")
    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pos`` (1, P, C), when given, is first added to the last P tokens (fused with norm1)."""
        if pos is not None:
            x, h = dk.add_pos_layernorm(x, pos, self.norm1.weight, self.norm1.bias, self.norm1.eps, backend=self.attn.backend)
        else:
            h = self.norm1(x)
        x = x + self.attn(h)
        return x + self.mlp(self.norm2(x))

    @annotate("distilpose.tde.layer")
    def forward_fused(
        self, x: torch.Tensor, res: Optional[torch.Tensor], pos: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same layer with every residual add fused into the next LayerNorm.

        Input stream ``x + res`` (``res``: the previous layer's MLP output, not yet added, or
        None), ``pos`` (1, P, C) added to its last P tokens when given. Returns ``(x, mlp_out)``:
        this layer's output is ``x + mlp_out``, left for the next layer (or the caller) to add.
        """
        be = self.attn.backend
        if res is None and pos is None:
            h = self.norm1(x)
        else:
            x, h = dk.add_pos_layernorm(x, pos, self.norm1.weight, self.norm1.bias, self.norm1.eps, backend=be,
                                        residual=res)
        x, h = dk.add_pos_layernorm(x, None, self.norm2.weight, self.norm2.bias, self.norm2.eps, backend=be,
                                    residual=self.attn(h))
        return x, self.mlp(h)


    @annotate("distilpose.tde.layer")
    def forward_add_norm(
        self, x: torch.Tensor, h: torch.Tensor, next_norm: Optional[nn.LayerNorm], pos: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The layer with its residual adds and LayerNorms in the GEMMs' epilogues (inference).

        ``h = norm1(x)`` is given (the previous layer's epilogue made it). Returns ``(x, h_next)``:
        the layer's output ``x`` (with ``pos`` added to its last P tokens when given) and
        ``next_norm(x)``; for the last layer (``next_norm`` None) ``(x, None)``.
        """
        attn, mlp = self.attn, self.mlp
        a = attn.attend(h)
        x, h = dk.linear_add_norm(a, attn.proj.weight, attn.proj.bias, x, self.norm2.weight, self.norm2.bias,
                                  self.norm2.eps)
        if next_norm is None:
            return x + mlp(h), None
        nw, nb, eps = next_norm.weight, next_norm.bias, next_norm.eps
        if mlp.mlp_kernel:
            return dk.fused_mlp_add_norm(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, x, nw, nb,
                                         eps, pos)
        if mlp.fuse_gelu:
            u = dk.linear_gelu(h, mlp.fc1.weight, mlp.fc1.bias)
        else:
            u = mlp.act(_linear(mlp.fc1, h, mlp.triton_linears))
        return dk.linear_add_norm(u, mlp.fc2.weight, mlp.fc2.bias, x, nw, nb, eps, pos)


#: "auto" decisions of the patch embedding (``TokenDistillingEncoder.embed_patches``), per key
_PATCH_CHOICES: dict = {}


class TokenDistillingEncoder(nn.Module):
    """(N, C, H, W) feature map -> (keypoint tokens (N, K, D), visual tokens (N, P, D)).

    Patchify into ``patch_size`` (ph, pw) patches flattened in (row, col, channel) order,
    Linear to D, prepend K learnable keypoint tokens, add the fixed sine table to the
    visual tokens (again before every layer after the first in "sine-full" mode), then
    ``depth`` pre-norm transformer layers.
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: Tuple[int, int] = (64, 48),
        patch_size: Tuple[int, int] = (4, 3),
        num_keypoints: int = 17,
        dim: int = 192,
        depth: int = 12,
        num_heads: int = 8,
        mlp_dim: int = 576,
        pos_mode: str = "sine-full",
        attention_backend: Optional[str] = None,
        fuse_pos_norm: bool = False,
    ):
        super().__init__()
        if pos_mode not in POS_MODES:
            raise ValueError(f"pos_mode: expected one of {POS_MODES}, got {pos_mode!r}")
        fh, fw = feature_size
        ph, pw = patch_size
        if fh % ph or fw % pw:
            raise ValueError(f"feature_size {feature_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.feature_size = (fh, fw)
        self.patch_size = (ph, pw)
        self.grid = (fh // ph, fw // pw)
        self.num_keypoints = num_keypoints
        self.num_patches = self.grid[0] * self.grid[1]
        self.dim = dim
        self.pos_mode = pos_mode
        #: Run every "residual add (+ position re-add) + LayerNorm" as the fused add_pos_layernorm
        #: op (TransformerLayer.forward_fused). Off by default for training until a GPU
        #: measurement shows it pays; InferenceEngine turns it on. Same math either way.
        self.fuse_pos_norm = fuse_pos_norm
        #: Inference: run those steps in the epilogues of the attention projection and the MLP's
        #: last GEMM instead (TransformerLayer.forward_add_norm, 4 to 5 kernels per layer). Takes
        #: precedence over fuse_pos_norm; with autograd the ops run their reference. Set by
        #: InferenceEngine.
        self.fuse_add_norm = False
        #: the patch embedding's path: "auto" (timed in inference on CUDA), "conv" or "gemm"
        #: (``embed_patches``); the same math
        self.patch_backend = "auto"
        self.patch_embed = nn.Linear(ph * pw * in_channels, dim)
        self.keypoint_token = nn.Parameter(torch.zeros(1, num_keypoints, dim))
        self.register_buffer("pos_embedding", sine_position_table(self.grid[0], self.grid[1], dim))
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_dim, attention_backend) for _ in range(depth)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.keypoint_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, P, ph*pw*C), patches row-major, values in (row, col, channel) order."""
        n, c, h, w = feat.shape
        ph, pw = self.patch_size
        gh, gw = self.grid
        x = feat.reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, gh * gw, ph * pw * c)

    def embed_patches(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> visual tokens (N, P, D) = ``patch_embed(patchify(feat))``.

        ``patch_backend`` "conv": the strided convolution below; "gemm": ``patchify`` then
        ``distilpose_kernels.linear`` (one GEMM, K = ph*pw*C = 3072: at batch 1 the conv runs on
        few output tiles, the GEMM's split tiles on more); "auto" (default): in inference on
        CUDA (no grad, not compiling) both are timed once per input shape, dtype and layout
        (``distilpose_kernels.timed_choice``, device time inside a CUDA-graph warm-up) and the
        faster is kept; elsewhere "conv".
        """
        backend = self.patch_backend
        if backend == "auto":
            if not feat.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling():
                backend = "conv"
            else:
                key = ("patch_embed", tuple(feat.shape), feat.dtype, tuple(feat.stride()), self.patch_size,
                       self.patch_embed.weight.dtype, feat.device.index,
                       torch.is_autocast_enabled(feat.device.type))
                gemm = dk.timed_choice(
                    _PATCH_CHOICES, key, lambda: self._embed_gemm(feat), lambda: self._embed_conv(feat),
                    lambda got, ref: dk.agrees_at_dtype(got, ref, 2e-2, 1e-2),
                    "patch embedding: patchify + distilpose_kernels.linear")
                backend = "gemm" if gemm else "conv"
        return self._embed_gemm(feat) if backend == "gemm" else self._embed_conv(feat)

    def _embed_gemm(self, feat: torch.Tensor) -> torch.Tensor:
        return dk.linear(self.patchify(feat), self.patch_embed.weight, self.patch_embed.bias)

    def _embed_conv(self, feat: torch.Tensor) -> torch.Tensor:
        """The patch embedding as a (ph, pw)-strided convolution with the Linear's weight viewed
        as (D, C, ph, pw).

        Same math as the Linear on patch vectors, without materialising them: that permute
        copy gathers with the channel innermost, so an NCHW map is read uncoalesced (the
        largest elementwise kernel of batch-256 inference in the H200 profile). From an NCHW map
        the (N, D, gh, gw) conv output is transposed once (P*D per image, cache-resident); from a
        channels-last map it already is (N, P, D).
        """
        ph, pw = self.patch_size
        w = self.patch_embed.weight.view(self.dim, ph, pw, self.in_channels).permute(0, 3, 1, 2)
        out = F.conv2d(feat, w, self.patch_embed.bias, stride=(ph, pw))
        return out.flatten(2).transpose(1, 2).contiguous()

    @annotate("distilpose.tde")
    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if feat.dim() != 4 or tuple(feat.shape[1:]) != (self.in_channels, *self.feature_size):
            raise ValueError(
                f"feat: expected (N, {self.in_channels}, {self.feature_size[0]}, {self.feature_size[1]}), "
                f"got {tuple(feat.shape)}"
            )
        k = self.num_keypoints
        vis = self.embed_patches(feat)
        # the residual stream's dtype, by PyTorch's promotion: under autocast the patch embedding is
        # 16-bit but the tokens and the table are fp32 parameters, so the stream stays fp32 (as in
        # any autocast model); a model stored in bf16 (InferenceEngine(cast_model=True)) runs bf16
        dt = torch.promote_types(vis.dtype, self.keypoint_token.dtype)
        pos = self.pos_embedding.to(dt)
        vis = vis.to(dt)
        kpt = self.keypoint_token.expand(vis.shape[0], -1, -1).to(dt)
        if self.fuse_add_norm:
            re_add = self.pos_mode == "sine-full"
            norm1 = self.layers[0].norm1
            if self.pos_mode != "none":  # the table's add and the first LayerNorm: one kernel
                x, h = dk.add_pos_layernorm(torch.cat((kpt, vis), dim=1), pos, norm1.weight, norm1.bias, norm1.eps)
            else:
                x = torch.cat((kpt, vis), dim=1)
                h = norm1(x)
            for i, layer in enumerate(self.layers):
                last = i + 1 == len(self.layers)
                x, h = layer.forward_add_norm(x, h, None if last else self.layers[i + 1].norm1,
                                              pos if re_add and not last else None)
            return x[:, :k], x[:, k:]
        if self.pos_mode != "none":
            vis = vis + pos
        x = torch.cat((kpt, vis), dim=1)
        if self.fuse_pos_norm:
            res = None
            for i, layer in enumerate(self.layers):
                x, res = layer.forward_fused(x, res, pos if i > 0 and self.pos_mode == "sine-full" else None)
            if res is not None:
                x = x + res
            return x[:, :k], x[:, k:]
        for i, layer in enumerate(self.layers):
            if i > 0 and self.pos_mode == "sine-full":
                x = torch.cat((x[:, :k], x[:, k:] + pos), dim=1)
            x = layer(x)
        return x[:, :k], x[:, k:]
