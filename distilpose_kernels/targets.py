"""Teacher training targets: Gaussian heatmaps with mmpose's encodings (msra / unbiased / udp).

Conventions (mmpose 0.x ``TopDownGenerateTarget``, reproduced exactly, quirks included):

- sizes are (height, width); keypoints (N, K, 2) are (x, y) in input-crop pixels.
- ``tmp_size = 3 * sigma``; ``weight = visibility`` (as given: 0/1 flags or soft weights), set to 0
  when the Gaussian's 3-sigma box lies wholly outside the heatmap or the keypoint is not finite;
  the Gaussian is drawn only where ``weight > 0.5``; maps of undrawn keypoints are all zero.
- "msra": stride = input / heatmap; integer centre ``mu = int(x / stride + 0.5)`` (Python ``int``
  truncation); the patch ``exp(-((i - size//2)^2 + (j - size//2)^2) / (2 sigma^2))``,
  ``size = 2 tmp_size + 1``, is pasted on [ul, br) with ``ul = int(mu - tmp_size)``,
  ``br = int(mu + tmp_size + 1)`` clipped to the grid; the off-grid test uses ul/br.
- "unbiased" (DARK): sub-pixel centre ``mu = x / stride``; the Gaussian covers the full grid;
  off-grid test on the float box [mu - tmp_size, mu + tmp_size + 1].
- "udp": stride = (input - 1) / (heatmap - 1); as msra, with the patch centre shifted by the
  sub-pixel offset ``x / stride - mu`` (``_udp_generate_target``, GaussianHeatmap mode).
- optional ``joint_weights`` (K,) multiply the weights (mmpose ``use_different_joint_weights``).

Paths (``backend``): "cuda" / "cpp", the compiled extension's kernel (csrc/cuda/targets_cuda.cu,
csrc/cpu/targets_cpu.cpp; the default on CUDA when the extension is built with CUDA: one
dispatcher call, no Triton launch path on the host); "triton", the Triton kernel (the default on
CUDA otherwise); "reference", a vectorised PyTorch path (no Python loop over samples or
keypoints; the default elsewhere). The kernels write every output element and share one float32
arithmetic.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _ext
from ._utils import annotate, check_same_device, check_tensor, force_reference, lazy_module, select_triton_backend

TARGET_ENCODINGS = ("msra", "unbiased", "udp")
_ENC_ID = {name: i for i, name in enumerate(TARGET_ENCODINGS)}  # matches heatmap_triton.ENC_*


def _size_pair(name: str, v: object, minimum: int = 1) -> Tuple[int, int]:
    try:
        h, w = v  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width), got {v!r}") from None
    for x in (h, w):
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            raise ValueError(f"{name}: expected (height, width) ints >= {minimum}, got {v!r}")
    return int(h), int(w)


def encoding_constants(
    input_size: Tuple[int, int], heatmap_size: Tuple[int, int], sigma: float, encoding: int
) -> Tuple[float, float, float, int, float]:
    """-> (stride_x, stride_y, tmp_size, len(patch), patch centre index size // 2)."""
    (ih, iw), (hh, hw) = input_size, heatmap_size
    if encoding == _ENC_ID["udp"]:
        stride_x, stride_y = (iw - 1.0) / (hw - 1.0), (ih - 1.0) / (hh - 1.0)
    else:
        stride_x, stride_y = iw / hw, ih / hh
    tmp_size = 3.0 * sigma
    size = 2.0 * tmp_size + 1.0
    return stride_x, stride_y, tmp_size, int(math.ceil(size)), float(size // 2)


def _check_static_args(input_size, heatmap_size, sigma, encoding) -> Tuple[Tuple[int, int], Tuple[int, int], float]:
    if encoding not in TARGET_ENCODINGS:
        raise ValueError(f"encoding: expected one of {TARGET_ENCODINGS}, got {encoding!r}")
    minimum = 2 if encoding == "udp" else 1  # udp divides by (size - 1)
    ins = _size_pair("input_size", input_size, minimum)
    hms = _size_pair("heatmap_size", heatmap_size, minimum)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma: expected a positive finite float, got {sigma!r}")
    return ins, hms, float(sigma)


# The sizes, sigma and encoding are the same on every call of a training run: validate once.
_check_static_args_cached = functools.lru_cache(maxsize=64, typed=True)(_check_static_args)


def _check_targets_inputs(keypoints, visibility, input_size, heatmap_size, sigma, encoding, joint_weights):
    check_tensor("keypoints", keypoints, ndim=3, floating=True)
    n, k, two = keypoints.shape
    if two != 2:
        raise ValueError(f"keypoints: expected shape (N, K, 2) (x, y in input pixels), got {tuple(keypoints.shape)}")
    check_tensor("visibility", visibility)
    if tuple(visibility.shape) not in ((n, k), (n, k, 1)):
        raise ValueError(f"visibility: expected shape ({n}, {k}) or ({n}, {k}, 1), got {tuple(visibility.shape)}")
    check_same_device(keypoints=keypoints, visibility=visibility)
    try:
        ins, hms, sigma = _check_static_args_cached(input_size, heatmap_size, sigma, encoding)
    except TypeError:  # unhashable (e.g. lists): validate uncached; errors for bad values name the argument
        ins, hms, sigma = _check_static_args(input_size, heatmap_size, sigma, encoding)
    if joint_weights is not None:
        check_tensor("joint_weights", joint_weights, shape=(k,))
        check_same_device(keypoints=keypoints, joint_weights=joint_weights)
    return ins, hms, sigma


def gaussian_heatmap_targets_reference(
    keypoints: torch.Tensor,
    visibility: torch.Tensor,
    input_size: Sequence[int],
    heatmap_size: Sequence[int],
    sigma: float = 2.0,
    encoding: str = "unbiased",
    joint_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch targets (float64 math; see the module docstring). -> float32 tensors."""
    ins, hms, sigma = _check_targets_inputs(
        keypoints, visibility, input_size, heatmap_size, sigma, encoding, joint_weights
    )
    n, k, _ = keypoints.shape
    hh, hw = hms
    enc = _ENC_ID[encoding]
    stride_x, stride_y, tmp, gsize, half = encoding_constants(ins, hms, sigma, enc)
    kp = keypoints.detach().to(torch.float64)
    vis = visibility.detach().reshape(n, k).to(torch.float32)
    finite = torch.isfinite(kp).all(-1)
    kp = torch.where(finite[..., None], kp, torch.zeros_like(kp)).clamp(-1e7, 1e7)
    fx, fy = kp[..., 0] / stride_x, kp[..., 1] / stride_y
    if encoding == "unbiased":
        cx, cy = fx, fy
        off = (fx - tmp >= hw) | (fy - tmp >= hh) | (fx + tmp + 1 < 0) | (fy + tmp + 1 < 0)
        x0 = torch.zeros_like(fx)
        y0 = torch.zeros_like(fy)
        x1 = torch.full_like(fx, hw)
        y1 = torch.full_like(fy, hh)
    else:
        mx, my = torch.trunc(fx + 0.5), torch.trunc(fy + 0.5)
        ulx, uly = torch.trunc(mx - tmp), torch.trunc(my - tmp)
        brx, bry = torch.trunc(mx + tmp + 1), torch.trunc(my + tmp + 1)
        off = (ulx >= hw) | (uly >= hh) | (brx < 0) | (bry < 0)
        cx, cy = ulx + half, uly + half
        if encoding == "udp":
            cx = cx + (fx - mx)
            cy = cy + (fy - my)
        x0, y0 = ulx.clamp(min=0), uly.clamp(min=0)
        x1 = torch.minimum(brx.clamp(max=hw), ulx + gsize)
        y1 = torch.minimum(bry.clamp(max=hh), uly + gsize)
    off = off | ~finite
    weight = torch.where(off, torch.zeros_like(vis), vis)
    draw = (weight > 0.5).to(torch.float64)
    xs = torch.arange(hw, device=kp.device, dtype=torch.float64)
    ys = torch.arange(hh, device=kp.device, dtype=torch.float64)
    inv = 1.0 / (2.0 * sigma * sigma)
    # separable: exp(-(dx^2 + dy^2) c) = exp(-dx^2 c) exp(-dy^2 c); windows are boxes
    gx = torch.exp(-((xs - cx[..., None]) ** 2) * inv) * ((xs >= x0[..., None]) & (xs < x1[..., None]))
    gy = torch.exp(-((ys - cy[..., None]) ** 2) * inv) * ((ys >= y0[..., None]) & (ys < y1[..., None]))
    gy = (gy * draw[..., None]).to(torch.float32)
    gx = gx.to(torch.float32)
    heatmaps = gy[..., :, None] * gx[..., None, :]  # the only (N, K, H, W) op: one fp32 product
    weight = weight[..., None]
    if joint_weights is not None:
        weight = weight * joint_weights.detach().to(torch.float32).view(1, k, 1)
    return heatmaps, weight


#: the Triton kernels module (imports triton: loaded only on the Triton path)
_kernels = lazy_module("distilpose_kernels.heatmap_triton")


@torch.library.custom_op("distilpose::simhm_targets", mutates_args=())
def _simhm_targets(
    keypoints: torch.Tensor,
    visibility: torch.Tensor,
    input_h: int,
    input_w: int,
    heatmap_h: int,
    heatmap_w: int,
    sigma: float,
    encoding: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().targets(
        keypoints, visibility, (input_h, input_w), (heatmap_h, heatmap_w), sigma, encoding, torch.float32
    )


@_simhm_targets.register_fake
def _(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma, encoding):
    n, k = keypoints.shape[:2]
    return (
        keypoints.new_empty((n, k, heatmap_h, heatmap_w), dtype=torch.float32),
        keypoints.new_empty((n, k, 1), dtype=torch.float32),
    )


# The compiled extension's kernels (csrc/cpu/targets_cpu.cpp, csrc/cuda/targets_cuda.cu): the schema is
# defined here, so the op and its fake kernel exist whether or not the extension was built.
_ext_lib = torch.library.Library("distilpose", "FRAGMENT")
_ext_lib.define(
    "simhm_targets_ext(Tensor keypoints, Tensor visibility, int input_h, int input_w, int heatmap_h, "
    "int heatmap_w, float sigma, int encoding) -> (Tensor heatmaps, Tensor weights)"
)


@torch.library.register_fake("distilpose::simhm_targets_ext", lib=_ext_lib)
def _(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma, encoding):
    n, k = keypoints.shape[:2]
    return (keypoints.new_empty((n, k, heatmap_h, heatmap_w), dtype=torch.float32),
            keypoints.new_empty((n, k, 1), dtype=torch.float32))


_ext.load()  # registers the compiled kernels, if built
_EXT_TARGETS_OPS = ("simhm_targets_ext",)
_ext_targets_op: list = []  # [torch.ops.distilpose.simhm_targets_ext.default], resolved on first use
TARGET_BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


def extension_targets_available(device_type: str) -> bool:
    """Whether the compiled extension serves ``gaussian_heatmap_targets`` on ``device_type``."""
    return _ext.available(device_type, _EXT_TARGETS_OPS)


def _ext_targets():
    if not _ext_targets_op:
        _ext_targets_op.append(torch.ops.distilpose.simhm_targets_ext.default)
    return _ext_targets_op[0]


def _targets_backend(keypoints: torch.Tensor, visibility: torch.Tensor, backend: Optional[str]) -> str:
    """"reference", "triton" or "extension" (``backend`` as in gaussian_heatmap_targets)."""
    if backend in ("cpp", "cuda"):
        _ext.require("gaussian_heatmap_targets", backend, {"keypoints": keypoints, "visibility": visibility},
                     _EXT_TARGETS_OPS)
        return "extension"
    if backend in (None, "auto") and keypoints.is_cuda and not force_reference() and \
            extension_targets_available("cuda"):
        return "extension"  # one dispatcher call: no Triton launch path on the host
    if backend is not None and backend not in TARGET_BACKENDS:
        raise ValueError(f"backend: expected None or one of {TARGET_BACKENDS}, got {backend!r}")
    return select_triton_backend("gaussian_heatmap_targets", (keypoints, visibility), backend)


@annotate("distilpose.gaussian_heatmap_targets")
def gaussian_heatmap_targets(
    keypoints: torch.Tensor,
    visibility: torch.Tensor,
    input_size: Sequence[int],
    heatmap_size: Sequence[int],
    sigma: float = 2.0,
    encoding: str = "unbiased",
    joint_weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher Gaussian heatmap targets and per-keypoint weights (mmpose conventions).

    keypoints: (N, K, 2) (x, y) in input-crop pixels; visibility: (N, K) or (N, K, 1);
    input_size, heatmap_size: (height, width), e.g. (256, 192) and (64, 48); sigma in heatmap
    pixels; encoding: "msra" | "unbiased" (the spec's teacher target, default) | "udp".
    Returns (heatmaps (N, K, H, W) float32, weights (N, K, 1) float32). Not differentiable.
    backend: None/"auto", "cuda" / "cpp" (the compiled extension), "triton" or "reference".
    See the module docstring for the exact encoding rules.
    """
    ins, hms, sigma = _check_targets_inputs(
        keypoints, visibility, input_size, heatmap_size, sigma, encoding, joint_weights
    )
    be = _targets_backend(keypoints, visibility, backend)
    if be == "reference":
        return gaussian_heatmap_targets_reference(
            keypoints, visibility, ins, hms, sigma, encoding, joint_weights
        )
    n, k, _ = keypoints.shape
    vis = visibility.detach().reshape(n, k)
    if vis.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        vis = vis.to(torch.float32)
    if be == "extension":
        kp32 = keypoints.detach()
        kp32 = (kp32 if kp32.dtype == torch.float32 else kp32.float()).contiguous()
        vis32 = (vis if vis.dtype == torch.float32 else vis.float()).contiguous()
        heatmaps, weight = _ext_targets()(kp32, vis32, ins[0], ins[1], hms[0], hms[1], sigma, _ENC_ID[encoding])
        if joint_weights is not None:
            weight = weight * joint_weights.detach().to(torch.float32).view(1, k, 1)
        return heatmaps, weight
    args = (keypoints.detach().contiguous(), vis.contiguous(), ins[0], ins[1], hms[0], hms[1], sigma, _ENC_ID[encoding])
    if torch.compiler.is_compiling():
        heatmaps, weight = _simhm_targets(*args)
    else:  # eager: skip the custom-op dispatch overhead
        heatmaps, weight = _kernels().targets(args[0], args[1], ins, hms, sigma, args[7], torch.float32)
    if joint_weights is not None:
        weight = weight * joint_weights.detach().to(torch.float32).view(1, k, 1)
    return heatmaps, weight


class GaussianHeatmapTargets(nn.Module):
    """Module form of ``gaussian_heatmap_targets`` with fixed sizes, sigma and encoding.

    forward(keypoints (N, K, 2) input px, visibility (N, K[, 1])) -> (heatmaps, weights).
    """

    def __init__(
        self,
        input_size: Sequence[int] = (256, 192),
        heatmap_size: Sequence[int] = (64, 48),
        sigma: float = 2.0,
        encoding: str = "unbiased",
        joint_weights: Optional[Sequence[float]] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if encoding not in TARGET_ENCODINGS:
            raise ValueError(f"encoding: expected one of {TARGET_ENCODINGS}, got {encoding!r}")
        self.input_size = _size_pair("input_size", tuple(input_size))
        self.heatmap_size = _size_pair("heatmap_size", tuple(heatmap_size))
        self.sigma = float(sigma)
        self.encoding = encoding
        self.backend = backend
        jw = None if joint_weights is None else torch.as_tensor(joint_weights, dtype=torch.float32)
        self.register_buffer("joint_weights", jw, persistent=False)

    def forward(self, keypoints: torch.Tensor, visibility: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return gaussian_heatmap_targets(
            keypoints, visibility, self.input_size, self.heatmap_size, self.sigma, self.encoding,
            self.joint_weights, self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, heatmap_size={self.heatmap_size}, sigma={self.sigma}, "
            f"encoding={self.encoding!r}"
        )
