"""Heatmap decoding: soft-argmax (differentiable integral regression) and argmax / DARK.

Ops (all take heatmaps of shape (N, K, H, W), any strides, float32/float16/bfloat16/float64):

- ``soft_argmax(heatmaps, beta=1.0)`` -> ``coords`` (N, K, 2) as (x, y) in heatmap pixels
  (pixel centres at integers), ``confidence`` (N, K).
  ``p = softmax(beta * heatmap)`` over the H*W pixels, ``coords = sum_i p_i * (x_i, y_i)``,
  ``confidence = max_i p_i`` (the largest softmax probability, in (0, 1]; 1 for a single
  peak, 1/(H*W) for a flat map). Gradients flow to the heatmaps through ``coords``;
  ``confidence`` is a score and is not differentiable.
- ``decode_heatmaps(heatmaps, method="argmax" | "dark", kernel=11)`` -> ``coords`` (N, K, 2)
  in heatmap pixels, ``maxvals`` (N, K) (the heatmap maximum; mmpose returns (N, K, 1)).
  "argmax": mmpose ``_get_max_preds`` plus the quarter-pixel shift toward the higher
  neighbour (applied strictly inside the map, 1 < x < W-1 and 1 < y < H-1, as mmpose);
  "dark": mmpose 0.x ``post_process="unbiased"`` (DARK): Gaussian modulation with a
  ``kernel`` x ``kernel`` cv2 Gaussian, log, then one Taylor step with the Hessian around
  the integer argmax (applied where 1 < x < W-2 and 1 < y < H-2). No gradient.
  The reference blurs the whole map and rescales it to the original maximum, as mmpose;
  the compiled kernels blur only the 13 pixels the Taylor step reads and skip the rescale
  (a factor >= 1 that cancels in the log-derivatives) unless one of those blurred values is
  <= 1e-9: then mmpose's 1e-10 clamp can bite (weak peaks in zero-mean noise, sparse maps),
  the factor no longer cancels, and the kernels (C++ and CUDA) compute the whole-map blur
  maximum and rescale as mmpose.
- ``flip_heatmaps(heatmaps, flip_pairs, shift=True)``: mirror W, swap left/right channels
  and shift one pixel right, as the flip test of TokenPose / mmpose.

Outputs are float32 (float64 for float64 heatmaps); the math runs in the output dtype, except
DARK's Gaussian blur, which is float32 for every input (as mmpose's cv2 blur).

Non-finite policy (the same on every backend, tested):
- soft_argmax: ``-inf`` logits have probability 0 (masking). A heatmap containing NaN or
  ``+inf``, or whose logits are all ``-inf``, has no distribution: its coords and confidence
  are NaN (other heatmaps of the batch are unaffected; no error is raised). Large ``beta``
  is safe: the exponent is ``beta * (h - max h) <= 0``, so nothing overflows.
- decode_heatmaps (mmpose semantics): a heatmap whose maximum is <= 0 or NaN yields coords
  (-1, -1); ``maxvals`` is that maximum (NaN if the map has a NaN). ``+inf`` is a valid
  maximum (first occurrence). A refinement whose result would not be finite is skipped.

Backends: the compiled extension ``distilpose_kernels._C`` (C++ on CPU, CUDA on GPU) when
it was built for the tensor's device, else the pure-PyTorch reference. ``backend`` is one of
None/"auto", "reference", "cpp" (C++ kernels, CPU tensors) and "cuda" (CUDA kernels).
DISTILPOSE_FORCE_REFERENCE=1 makes "auto" pick the reference.

Registration: the schemas ``distilpose::soft_argmax_fwd``, ``distilpose::soft_argmax_bwd``
and ``distilpose::decode_heatmaps`` are defined here, once, in Python (a FRAGMENT of the
shared namespace), together with their fake kernels and the autograd of soft_argmax_fwd.
The C++/CUDA library only adds kernels (TORCH_LIBRARY_IMPL). When it is absent (or lacks
CUDA), the same ops get PyTorch kernels for the missing devices, so ``torch.ops`` calls,
``torch.compile`` and exported graphs work either way.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _ext
from ._utils import annotate, check_tensor, force_reference

__all__ = [
    "soft_argmax",
    "soft_argmax_reference",
    "decode_heatmaps",
    "decode_heatmaps_reference",
    "flip_heatmaps",
    "SoftArgmax",
]

HEATMAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DECODE_METHODS = ("argmax", "dark")
MAX_BLUR_KERNEL = 63  # kMaxBlurKernel in csrc/decode_math.h

# ----------------------------------------------------------------------------- schemas

_lib = torch.library.Library("distilpose", "FRAGMENT")
_lib.define("soft_argmax_fwd(Tensor heatmaps, float beta) -> (Tensor coords, Tensor confidence, Tensor hmax)")
_lib.define(
    "soft_argmax_bwd(Tensor grad_coords, Tensor heatmaps, Tensor coords, Tensor confidence, Tensor hmax, "
    "float beta) -> Tensor"
)
_lib.define("decode_heatmaps(Tensor heatmaps, str method, int kernel) -> (Tensor coords, Tensor maxvals)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- input checks


def _check_heatmaps(heatmaps: Tensor) -> Tensor:
    check_tensor("heatmaps", heatmaps, ndim=4, dtypes=HEATMAP_DTYPES)
    if heatmaps.shape[2] == 0 or heatmaps.shape[3] == 0:
        raise ValueError(f"heatmaps: H and W must be > 0, got shape {tuple(heatmaps.shape)}")
    return heatmaps


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta: expected a Python float, got {type(beta).__name__}")
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: expected a finite value > 0, got {beta}")
    return beta


def _check_decode_args(method: str, kernel: int) -> None:
    if method not in DECODE_METHODS:
        raise ValueError(f"method: expected one of {DECODE_METHODS}, got {method!r}")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0 or kernel > MAX_BLUR_KERNEL:
        raise ValueError(f"kernel: expected an odd int in [1, {MAX_BLUR_KERNEL}], got {kernel!r}")


def _resolve_backend(op: str, heatmaps: Tensor, backend: Optional[str]) -> str:
    """"extension" or "reference" for ``heatmaps``' device (see module docstring)."""
    backend = "auto" if backend is None else backend
    dev = heatmaps.device.type
    if backend == "reference":
        return "reference"
    if backend in ("cpp", "cuda"):
        _ext.require(op, backend, {"heatmaps": heatmaps})
        return "extension"
    if backend != "auto":
        raise ValueError(f"{op}: backend must be None, 'auto', 'reference', 'cpp' or 'cuda', got {backend!r}")
    if force_reference() or not _ext.available(dev):
        return "reference"
    return "extension"


# ----------------------------------------------------------------------------- references


def _pixel_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.arange(w, dtype=dtype, device=device), torch.arange(h, dtype=dtype, device=device)


def _soft_argmax_math(heatmaps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable PyTorch soft-argmax: (coords, confidence, hmax), accumulation dtype."""
    n, k, h, w = heatmaps.shape
    z = heatmaps.to(_acc_dtype(heatmaps.dtype)).reshape(n, k, h * w)
    # Shift by the (detached: softmax is shift-invariant) maximum; amax propagates NaN.
    hmax = z.detach().amax(dim=-1, keepdim=True)
    e = torch.exp((z - hmax) * beta)
    s = e.sum(dim=-1)
    p = (e / s.unsqueeze(-1)).reshape(n, k, h, w)
    xs, ys = _pixel_grid(h, w, z.dtype, z.device)
    x = (p.sum(dim=2) * xs).sum(dim=-1)
    y = (p.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack((x, y), dim=-1), (1.0 / s).detach(), hmax.squeeze(-1)


def soft_argmax_reference(heatmaps: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch soft-argmax (autograd natively). Same contract as :func:`soft_argmax`."""
    _check_heatmaps(heatmaps)
    beta = _check_beta(beta)
    coords, conf, _ = _soft_argmax_math(heatmaps, beta)
    return coords, conf


def _soft_argmax_bwd_math(grad_coords: Tensor, heatmaps: Tensor, coords: Tensor, confidence: Tensor,
                          hmax: Tensor, beta: float) -> Tensor:
    n, k, h, w = heatmaps.shape
    acc = _acc_dtype(heatmaps.dtype)
    z = heatmaps.to(acc)
    p = torch.exp((z - hmax.to(acc)[..., None, None]) * beta) * confidence.to(acc)[..., None, None]
    xs, ys = _pixel_grid(h, w, acc, z.device)
    g = grad_coords.to(acc)
    c = coords.to(acc)
    t = g[..., 0, None, None] * (xs - c[..., 0, None, None]) + g[..., 1, None, None] * (ys[:, None] - c[..., 1, None, None])
    return (beta * p * t).to(heatmaps.dtype)


def gaussian_kernel_1d(kernel: int) -> Tensor:
    """cv2.getGaussianKernel(kernel, 0) in float32 (the kernel mmpose's DARK blur uses)."""
    small = {
        1: [1.0],
        3: [0.25, 0.5, 0.25],
        5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
        7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
    }
    if kernel in small:
        return torch.tensor(small[kernel], dtype=torch.float32)
    sigma = ((kernel - 1) * 0.5 - 1) * 0.3 + 0.8
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) * 0.5
    g = torch.exp(-0.5 * x * x / (sigma * sigma))
    return (g / g.sum()).to(torch.float32)


def _first_argmax(flat: Tensor) -> tuple[Tensor, Tensor]:
    """numpy semantics: value and first index of the maximum; a NaN wins (first NaN)."""
    nan = torch.isnan(flat)
    has_nan = nan.any(dim=-1)
    idx = torch.where(has_nan, nan.to(torch.uint8).argmax(dim=-1), flat.argmax(dim=-1))
    return flat.gather(-1, idx[:, None]).squeeze(-1), idx


def decode_heatmaps_reference(heatmaps: Tensor, method: str = "argmax", kernel: int = 11) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch decoding, mmpose-faithful (full-map blur and rescale for DARK).

    Same contract as :func:`decode_heatmaps`.
    """
    _check_heatmaps(heatmaps)
    _check_decode_args(method, kernel)
    n, k, h, w = heatmaps.shape
    acc = _acc_dtype(heatmaps.dtype)
    hm = heatmaps.detach().to(acc).reshape(n * k, h, w)
    flat = hm.reshape(n * k, h * w)
    if n * k == 0:
        e = hm.new_empty((n, k, 2))
        return e, hm.new_empty((n, k))
    maxvals, idx = _first_argmax(flat)
    px, py = idx % w, torch.div(idx, w, rounding_mode="floor")
    x, y = px.to(acc), py.to(acc)

    def at(src: Tensor, dx: int, dy: int) -> Tensor:
        qx, qy = (px + dx).clamp(0, w - 1), (py + dy).clamp(0, h - 1)
        return src.reshape(n * k, h * w).gather(-1, (qy * w + qx)[:, None]).squeeze(-1)

    found = maxvals > 0
    if method == "argmax":
        inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
        sx = torch.nan_to_num(torch.sign(at(flat, 1, 0) - at(flat, -1, 0)), nan=0.0)
        sy = torch.nan_to_num(torch.sign(at(flat, 0, 1) - at(flat, 0, -1)), nan=0.0)
        x = torch.where(inside, x + 0.25 * sx, x)
        y = torch.where(inside, y + 0.25 * sy, y)
    else:
        g = gaussian_kernel_1d(kernel).to(device=hm.device)
        r = kernel // 2
        img = hm.float()[:, None]
        blur = torch.nn.functional.conv2d(img, g.view(1, 1, 1, kernel), padding=(0, r))
        blur = torch.nn.functional.conv2d(blur, g.view(1, 1, kernel, 1), padding=(r, 0))[:, 0]
        bmax = blur.reshape(n * k, -1).amax(dim=-1)
        blur = blur * (maxvals.float() / bmax)[:, None, None]
        logb = torch.log(torch.clamp(blur, min=1e-10)).double()
        v = {(dx, dy): at(logb, dx, dy) for dx, dy in
             [(0, 0), (1, 0), (-1, 0), (2, 0), (-2, 0), (0, 1), (0, -1), (0, 2), (0, -2), (1, 1), (-1, 1), (1, -1), (-1, -1)]}
        dx = 0.5 * (v[1, 0] - v[-1, 0])
        dy = 0.5 * (v[0, 1] - v[0, -1])
        dxx = 0.25 * (v[2, 0] - 2 * v[0, 0] + v[-2, 0])
        dxy = 0.25 * (v[1, 1] - v[1, -1] - v[-1, 1] + v[-1, -1])
        dyy = 0.25 * (v[0, 2] - 2 * v[0, 0] + v[0, -2])
        det = dxx * dyy - dxy * dxy
        safe = torch.where(det != 0, det, torch.ones_like(det))
        ox = -(dyy * dx - dxy * dy) / safe
        oy = -(-dxy * dx + dxx * dy) / safe
        ok = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2) & (det != 0) & torch.isfinite(ox) & torch.isfinite(oy)
        x = torch.where(ok, (x.double() + ox).to(acc), x)
        y = torch.where(ok, (y.double() + oy).to(acc), y)
    x = torch.where(found, x, torch.full_like(x, -1))
    y = torch.where(found, y, torch.full_like(y, -1))
    return torch.stack((x, y), dim=-1).reshape(n, k, 2), maxvals.reshape(n, k)


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("distilpose::soft_argmax_fwd", lib=_lib)
def _soft_argmax_fwd_fake(heatmaps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    n, k = heatmaps.shape[0], heatmaps.shape[1]
    acc = _acc_dtype(heatmaps.dtype)
    return (heatmaps.new_empty((n, k, 2), dtype=acc), heatmaps.new_empty((n, k), dtype=acc),
            heatmaps.new_empty((n, k), dtype=acc))


@torch.library.register_fake("distilpose::soft_argmax_bwd", lib=_lib)
def _soft_argmax_bwd_fake(grad_coords, heatmaps, coords, confidence, hmax, beta):
    return torch.empty_like(heatmaps, memory_format=torch.contiguous_format)


@torch.library.register_fake("distilpose::decode_heatmaps", lib=_lib)
def _decode_heatmaps_fake(heatmaps: Tensor, method: str, kernel: int) -> tuple[Tensor, Tensor]:
    n, k = heatmaps.shape[0], heatmaps.shape[1]
    acc = _acc_dtype(heatmaps.dtype)
    return heatmaps.new_empty((n, k, 2), dtype=acc), heatmaps.new_empty((n, k), dtype=acc)


# ----------------------------------------------------------------------------- autograd


def _soft_argmax_setup_context(ctx, inputs, output) -> None:
    heatmaps, beta = inputs
    coords, confidence, hmax = output
    ctx.save_for_backward(heatmaps, coords, confidence, hmax)
    ctx.beta = beta
    ctx.mark_non_differentiable(confidence, hmax)


def _soft_argmax_bwd_differentiable(grad_coords: Tensor, heatmaps: Tensor, beta: float) -> Tensor:
    """The soft-argmax gradient as differentiable PyTorch ops (for create_graph=True)."""
    n, k, h, w = heatmaps.shape
    acc = _acc_dtype(heatmaps.dtype)
    p = torch.softmax(heatmaps.to(acc).reshape(n, k, h * w) * beta, dim=-1).reshape(n, k, h, w)
    xs, ys = _pixel_grid(h, w, acc, heatmaps.device)
    c = torch.stack(((p.sum(dim=2) * xs).sum(dim=-1), (p.sum(dim=3) * ys).sum(dim=-1)), dim=-1)
    g = grad_coords.to(acc)
    t = (g[..., 0, None, None] * (xs - c[..., 0, None, None])
         + g[..., 1, None, None] * (ys[:, None] - c[..., 1, None, None]))
    return (beta * p * t).to(heatmaps.dtype)


def _soft_argmax_backward(ctx, grad_coords, grad_confidence, grad_hmax):
    heatmaps, coords, confidence, hmax = ctx.saved_tensors
    if grad_coords is None:
        return None, None
    if torch.is_grad_enabled() and (heatmaps.requires_grad or grad_coords.requires_grad):
        # create_graph=True (double backward): soft_argmax_bwd has no derivative of its own, so
        # the gradient is built from differentiable ops instead (else second derivatives are
        # silently wrong: the compiled op's output would be treated as a constant)
        return _soft_argmax_bwd_differentiable(grad_coords, heatmaps, ctx.beta), None
    grad = torch.ops.distilpose.soft_argmax_bwd(grad_coords, heatmaps, coords, confidence, hmax, ctx.beta)
    return grad, None


torch.library.register_autograd(
    "distilpose::soft_argmax_fwd", _soft_argmax_backward, setup_context=_soft_argmax_setup_context, lib=_lib
)

# ----------------------------------------------------------------------------- kernels

_EXT = _ext.load()  # registers the compiled kernels, if built


def _py_soft_argmax_fwd(heatmaps: Tensor, beta: float):
    with torch.no_grad():
        return tuple(t.contiguous() for t in _soft_argmax_math(heatmaps, beta))


def _py_soft_argmax_bwd(grad_coords, heatmaps, coords, confidence, hmax, beta):
    with torch.no_grad():
        return _soft_argmax_bwd_math(grad_coords, heatmaps, coords, confidence, hmax, beta).contiguous()


def _py_decode_heatmaps(heatmaps: Tensor, method: str, kernel: int):
    coords, maxvals = decode_heatmaps_reference(heatmaps, method, kernel)
    return coords.contiguous(), maxvals.contiguous()


#: dispatch key -> "compiled" or "python" (PyTorch kernels registered because _C lacks it)
KERNEL_SOURCES: dict[str, str] = {}
for _key in ("CPU", "CUDA"):
    if _key in _EXT.dispatch_keys:
        KERNEL_SOURCES[_key] = "compiled"
    else:
        _lib.impl("soft_argmax_fwd", _py_soft_argmax_fwd, _key)
        _lib.impl("soft_argmax_bwd", _py_soft_argmax_bwd, _key)
        _lib.impl("decode_heatmaps", _py_decode_heatmaps, _key)
        KERNEL_SOURCES[_key] = "python"

# ----------------------------------------------------------------------------- public API


@annotate("distilpose.soft_argmax")
def soft_argmax(heatmaps: Tensor, beta: float = 1.0, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Differentiable soft-argmax of (N, K, H, W) heatmaps.

    Returns ``coords`` (N, K, 2) as (x, y) in heatmap pixels and ``confidence`` (N, K), the
    largest softmax probability (not differentiable), both float32 (float64 for float64
    input). See the module docstring for the NaN/inf policy.
    """
    _check_heatmaps(heatmaps)
    beta = _check_beta(beta)
    if _resolve_backend("soft_argmax", heatmaps, backend) == "reference":
        coords, conf, _ = _soft_argmax_math(heatmaps, beta)
        return coords, conf
    if not (heatmaps.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
        # nothing to differentiate: skip the Python autograd kernel registered for the op
        with torch._C._AutoDispatchBelowAutograd():
            coords, conf, _ = torch.ops.distilpose.soft_argmax_fwd(heatmaps, beta)
        return coords, conf
    coords, conf, _ = torch.ops.distilpose.soft_argmax_fwd(heatmaps, beta)
    return coords, conf


@annotate("distilpose.decode_heatmaps")
def decode_heatmaps(heatmaps: Tensor, method: str = "argmax", kernel: int = 11, *,
                    backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Decode (N, K, H, W) heatmaps to ``coords`` (N, K, 2) (x, y) heatmap pixels and ``maxvals`` (N, K).

    method "argmax" (quarter-pixel shift) or "dark" (Gaussian ``kernel``, Taylor step);
    mmpose semantics, (-1, -1) where the maximum is <= 0. No gradient.
    """
    _check_heatmaps(heatmaps)
    _check_decode_args(method, kernel)
    if _resolve_backend("decode_heatmaps", heatmaps, backend) == "reference":
        return decode_heatmaps_reference(heatmaps, method, kernel)
    return torch.ops.distilpose.decode_heatmaps(heatmaps.detach(), method, kernel)


FlipPairs = Union[Sequence[Sequence[int]], Tensor]


def _flip_pair_list(flip_pairs: Optional[FlipPairs]) -> list[tuple[int, int]]:
    """flip_pairs as a list of (left, right) ints; integer-like entries only (no silent truncation)."""
    if flip_pairs is None:
        return []
    seq = flip_pairs.tolist() if isinstance(flip_pairs, Tensor) else flip_pairs
    try:
        seq = list(seq)
    except TypeError:
        raise ValueError(f"flip_pairs: expected a sequence of (left, right) channel index pairs, "
                         f"got {flip_pairs!r}") from None
    pairs = []
    for pair in seq:
        try:
            vals = list(pair)
        except TypeError:
            vals = None
        if vals is None or len(vals) != 2:
            raise ValueError(f"flip_pairs: expected (left, right) pairs of channel indices, got {pair!r}")
        try:
            if any(isinstance(v, bool) for v in vals):
                raise TypeError
            pairs.append((operator.index(vals[0]), operator.index(vals[1])))
        except TypeError:
            raise ValueError(f"flip_pairs: expected integer channel indices, got {pair!r}") from None
    return pairs


def flip_heatmaps(heatmaps: Tensor, flip_pairs: Optional[FlipPairs], shift: bool = True) -> Tensor:
    """Map heatmaps predicted on a mirrored image back to the original frame.

    Mirrors W, swaps each (left, right) channel pair and, with ``shift``, moves the map one
    pixel right (``out[..., 1:] = out[..., :-1]``, column 0 kept), the TokenPose / mmpose
    flip-test alignment. heatmaps (N, K, H, W) -> (N, K, H, W). Differentiable.
    """
    check_tensor("heatmaps", heatmaps, ndim=4, floating=True)
    k = heatmaps.shape[1]
    out = heatmaps.flip(-1)
    pairs = _flip_pair_list(flip_pairs)
    if pairs:
        perm = list(range(k))
        for a, b in pairs:
            if not (0 <= a < k and 0 <= b < k):
                raise ValueError(f"flip_pairs: index out of range for K={k}: {[a, b]!r}")
            perm[a], perm[b] = b, a
        out = out[:, torch.tensor(perm, device=heatmaps.device)]
    if shift and out.shape[-1] > 1:
        out = torch.cat((out[..., :1], out[..., :-1]), dim=-1)
    return out


class SoftArgmax(nn.Module):
    """Soft-argmax head: (N, K, H, W) heatmaps -> (coords (N, K, 2) pixels, confidence (N, K)).

    ``normalize=True`` returns coords in [0, 1] as (x + 0.5) / W, (y + 0.5) / H.
    """

    def __init__(self, beta: float = 1.0, normalize: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self.beta = _check_beta(beta)
        self.normalize = normalize
        self.backend = backend

    def forward(self, heatmaps: Tensor) -> tuple[Tensor, Tensor]:
        coords, conf = soft_argmax(heatmaps, self.beta, backend=self.backend)
        if self.normalize:
            h, w = heatmaps.shape[-2:]
            coords = (coords + 0.5) / coords.new_tensor([w, h])
        return coords, conf

    def extra_repr(self) -> str:
        return f"beta={self.beta}, normalize={self.normalize}"
