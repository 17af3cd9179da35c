"""Heatmap decoding and flip helpers, through ``distilpose_kernels`` when available.

``decode_heatmaps`` and ``flip_heatmaps`` come from the kernels package's public API. When the
installed kernels package does not provide them yet, a local pure-PyTorch reference (SHIM,
below: mmpose's argmax + DARK and flip_back + one-pixel shift) is used;
``decode_backend()`` says which one runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import cv2
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- SHIM (reference)
def _decode_heatmaps_shim(heatmaps: torch.Tensor, method: str = "dark", kernel: int = 11) -> Tuple[torch.Tensor, torch.Tensor]:
    """SHIM: heatmaps (N, K, H, W) -> coords (N, K, 2) heatmap px (x, y), maxvals (N, K).

    "argmax": integer argmax plus mmpose's quarter-pixel shift towards the higher neighbour.
    "dark": Gaussian modulation (cv2 kernel ``kernel``, max preserved), log, one Taylor step
    with the Hessian (mmpose ``post_process='unbiased'``).
    """
    if method not in ("argmax", "dark"):
        raise ValueError(f"method: expected 'argmax' or 'dark', got {method!r}")
    hm = heatmaps.detach().to(torch.float64)
    n, k, h, w = hm.shape
    flat = hm.reshape(n, k, -1)
    maxvals, idx = flat.max(-1)
    x = (idx % w).to(torch.float64)
    y = torch.div(idx, w, rounding_mode="floor").to(torch.float64)
    coords = torch.stack([x, y], -1)
    coords = torch.where((maxvals > 0)[..., None], coords, torch.full_like(coords, -1.0))
    xi, yi = x.long(), y.long()

    def at(m, yy, xx):
        yy = yy.clamp(0, h - 1)
        xx = xx.clamp(0, w - 1)
        return m.reshape(n, k, -1).gather(2, (yy * w + xx)[..., None])[..., 0]

    if method == "argmax":
        ok_x = (xi > 1) & (xi < w - 1)  # mmpose: 1 < px < W - 1
        ok_y = (yi > 1) & (yi < h - 1)
        dx = torch.sign(at(hm, yi, xi + 1) - at(hm, yi, xi - 1)) * 0.25
        dy = torch.sign(at(hm, yi + 1, xi) - at(hm, yi - 1, xi)) * 0.25
        shift = torch.stack([torch.where(ok_x & ok_y, dx, 0.0), torch.where(ok_x & ok_y, dy, 0.0)], -1)
        coords = torch.where((maxvals > 0)[..., None], coords + shift, coords)
        return coords.to(heatmaps.dtype), maxvals.to(heatmaps.dtype)
    g = torch.as_tensor(cv2.getGaussianKernel(kernel, 0), dtype=torch.float64)
    g2 = (g @ g.T).view(1, 1, kernel, kernel)
    blur = F.conv2d(hm.reshape(n * k, 1, h, w), g2, padding=kernel // 2).reshape(n, k, h, w)
    bmax = blur.reshape(n, k, -1).max(-1).values
    blur = blur * (maxvals / bmax.clamp_min(1e-300))[..., None, None]
    lg = torch.log(blur.clamp_min(1e-10))
    inner = (xi > 1) & (xi < w - 2) & (yi > 1) & (yi < h - 2)
    dx = 0.5 * (at(lg, yi, xi + 1) - at(lg, yi, xi - 1))
    dy = 0.5 * (at(lg, yi + 1, xi) - at(lg, yi - 1, xi))
    dxx = 0.25 * (at(lg, yi, xi + 2) - 2 * at(lg, yi, xi) + at(lg, yi, xi - 2))
    dxy = 0.25 * (at(lg, yi + 1, xi + 1) - at(lg, yi - 1, xi + 1) - at(lg, yi + 1, xi - 1) + at(lg, yi - 1, xi - 1))
    dyy = 0.25 * (at(lg, yi + 2, xi) - 2 * at(lg, yi, xi) + at(lg, yi - 2, xi))
    det = dxx * dyy - dxy * dxy
    ok = inner & (det != 0) & (maxvals > 0)
    safe = torch.where(ok, det, torch.ones_like(det))
    ox = -(dyy * dx - dxy * dy) / safe
    oy = -(-dxy * dx + dxx * dy) / safe
    coords = coords + torch.stack([torch.where(ok, ox, 0.0), torch.where(ok, oy, 0.0)], -1)
    return coords.to(heatmaps.dtype), maxvals.to(heatmaps.dtype)


def _flip_heatmaps_shim(heatmaps: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]], shift: bool = True) -> torch.Tensor:
    """SHIM: heatmaps of a mirrored crop -> heatmaps of the original crop (mirror x, swap pairs,
    then mmpose's one-pixel shift to the right when ``shift``)."""
    perm = list(range(heatmaps.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    out = heatmaps.flip(-1)[:, perm]
    if shift:
        out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
    return out


# ----------------------------------------------------------------------------- resolution
def _kernels_attr(name: str) -> Optional[Callable]:
    try:
        import distilpose_kernels

        return getattr(distilpose_kernels, name)
    except (ImportError, AttributeError):
        return None


def decode_backend() -> str:
    """"distilpose_kernels" when its decode_heatmaps is importable, else "local-shim"."""
    return "distilpose_kernels" if _kernels_attr("decode_heatmaps") is not None else "local-shim"


def decode_heatmaps(heatmaps: torch.Tensor, method: str = "dark", kernel: int = 11) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, K, H, W) -> coords (N, K, 2) heatmap px, maxvals (N, K) (kernels op, else the shim)."""
    fn = _kernels_attr("decode_heatmaps") or _decode_heatmaps_shim
    coords, maxvals = fn(heatmaps, method=method, kernel=kernel)
    return coords, maxvals.reshape(coords.shape[0], coords.shape[1])


def flip_heatmaps(heatmaps: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]], shift: bool = True) -> torch.Tensor:
    """Heatmaps predicted on the mirrored crop, mapped back (kernels op, else the shim)."""
    fn = _kernels_attr("flip_heatmaps")
    if fn is None:
        return _flip_heatmaps_shim(heatmaps, flip_pairs, shift=shift)
    return fn(heatmaps, flip_pairs, shift=shift)


def flip_regression(coords: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Normalised coords (N, K, 2) predicted on the mirrored crop -> original crop: x' = 1 - x, swap pairs."""
    perm = list(range(coords.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    out = coords[:, perm].clone()
    out[..., 0] = 1.0 - out[..., 0]
    return out


def swap_pairs(t: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    perm = list(range(t.shape[1]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return t[:, perm]


__all__ = ["decode_heatmaps", "flip_heatmaps", "flip_regression", "swap_pairs", "decode_backend"]
