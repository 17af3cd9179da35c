"""Regression keypoints to image coordinates in one kernel: flip-test merge, crop pixels, and the
inverse of the data pipeline's affine crop.

A regression pose model (DistilPose's student, RLE, ...) predicts crop-normalised coordinates
and a confidence per keypoint. Turning them into image pixels takes about twenty small tensor
ops with the flip test: permute and mirror the flipped prediction, average, scale to crop
pixels, undo the crop's affine (with rotation), and the same for the scores. At batch 1 in a
CUDA graph each of those is a kernel of its own; this op is one.

Public API
- ``regression_to_image(coords, scores, center, scale, crop_size, rotation=None,
  flipped_coords=None, flipped_scores=None, flip_perm=None, backend=None)``: coords (N, K, 2)
  normalised (x / W, y / H), scores (N, K); the same two for the mirrored crops and the
  left/right permutation (K,) for the flip test; center (N, 2) and scale (N, 2) image px,
  rotation (N,) degrees, crop_size (H, W) -> (keypoints (N, K, 2) image px fp32, scores (N, K)
  fp32). Any float dtype and strides in, fp32 math.
  NaN: propagates, no error: a NaN prediction gives NaN for that keypoint (with the flip test,
  also for the keypoint it is merged into); a NaN center/scale/rotation for that box's keypoints.
  flip_perm: indices in [0, K); checked on CPU tensors (ValueError); on CUDA unchecked (no host
  sync), the kernel reads nothing for an index outside and gives NaN for that keypoint.
- ``regression_to_image_reference``: the same as PyTorch ops; ``flip_back_regression`` and
  ``crop_to_image`` are its two steps.

Backends: "reference"; "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1); None/"auto": the
kernel on CUDA, the reference elsewhere (DISTILPOSE_FORCE_REFERENCE=1 forces it). No gradient:
with autograd the reference runs. Registered as ``torch.ops.distilpose.regression_to_image``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._utils import annotate, check_tensor, lazy_module, select_triton_backend, triton_interpret

__all__ = ["crop_to_image", "flip_back_regression", "regression_to_image", "regression_to_image_reference"]

_triton_module = lazy_module("distilpose_kernels.keypoints_triton")


def flip_back_regression(coords: Tensor, perm: Tensor) -> Tensor:
    """Crop-normalised coords (N, K, 2) of a mirrored crop -> the original crop: keypoint k takes
    the prediction of ``perm[k]`` (left/right swap), x -> 1 - x. perm: (K,) long, coords' device."""
    x = coords.index_select(1, perm)
    return torch.stack((1.0 - x[..., 0], x[..., 1]), dim=-1)


def scale_xy(coords: Tensor, sx: float, sy: float) -> Tensor:
    """(..., 2) coordinates with x scaled by ``sx`` and y by ``sy``."""
    return torch.stack((coords[..., 0] * sx, coords[..., 1] * sy), dim=-1)


def crop_to_image(coords: Tensor, center: Tensor, scale: Tensor, rotation: Optional[Tensor],
                  crop_size: Tuple[int, int]) -> Tensor:
    """Crop pixels (N, K, 2) -> image pixels, inverting the affine crop: center (N, 2) image px,
    scale (N, 2) the crop's full extent in image px, rotation (N,) degrees or None, crop_size
    (H, W). In the coords' dtype, with no host-to-device copies (CUDA-graph safe)."""
    h, w = crop_size
    scale = scale.to(coords.dtype)
    vx = (coords[..., 0] - w / 2.0) * (scale[:, 0:1] / w)
    vy = (coords[..., 1] - h / 2.0) * (scale[:, 1:2] / h)
    if rotation is not None:
        r = torch.deg2rad(rotation.to(coords.dtype))[:, None]
        cos, sin = torch.cos(r), torch.sin(r)
        vx, vy = cos * vx - sin * vy, sin * vx + cos * vy
    center = center.to(coords.dtype)
    return torch.stack((vx + center[:, 0:1], vy + center[:, 1:2]), dim=-1)


def regression_to_image_reference(
    coords: Tensor, scores: Tensor, center: Tensor, scale: Tensor, crop_size: Tuple[int, int],
    rotation: Optional[Tensor] = None, flipped_coords: Optional[Tensor] = None,
    flipped_scores: Optional[Tensor] = None, flip_perm: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """PyTorch ops: (keypoints (N, K, 2) image px fp32, scores (N, K) fp32)."""
    c, s = coords.float(), scores.float()
    if flipped_coords is not None:
        c = (c + flip_back_regression(flipped_coords.float(), flip_perm)) * 0.5
        s = (s + flipped_scores.float().index_select(1, flip_perm)) * 0.5
    elif s is scores:
        s = s.clone()  # the scores returned are a new tensor, never the input
    h, w = crop_size
    return crop_to_image(scale_xy(c, float(w), float(h)), center, scale, rotation, (h, w)), s


def _check(coords, scores, center, scale, crop_size, rotation, flipped_coords, flipped_scores, flip_perm):
    check_tensor("coords", coords, ndim=3, floating=True)
    n, k, two = coords.shape
    if two != 2:
        raise ValueError(f"coords: expected shape (N, K, 2), got {tuple(coords.shape)}")
    dev = coords.device
    check_tensor("scores", scores, shape=(n, k), floating=True, device=dev)
    check_tensor("center", center, shape=(n, 2), floating=True, device=dev)
    check_tensor("scale", scale, shape=(n, 2), floating=True, device=dev)
    if rotation is not None:
        check_tensor("rotation", rotation, shape=(n,), floating=True, device=dev)
    if len(tuple(crop_size)) != 2 or min(int(v) for v in crop_size) <= 0:
        raise ValueError(f"crop_size: expected (H, W) positive, got {crop_size!r}")
    flip = [t is not None for t in (flipped_coords, flipped_scores, flip_perm)]
    if any(flip) and not all(flip):
        raise ValueError("flipped_coords, flipped_scores and flip_perm: give all three (flip test) or none")
    if all(flip):
        check_tensor("flipped_coords", flipped_coords, shape=(n, k, 2), floating=True, device=dev)
        check_tensor("flipped_scores", flipped_scores, shape=(n, k), floating=True, device=dev)
        check_tensor("flip_perm", flip_perm, shape=(k,), dtypes=(torch.int64, torch.int32), device=dev)
        if k and flip_perm.device.type == "cpu" and not torch.compiler.is_compiling():  # no host sync on CPU
            perm = flip_perm.numpy()  # numpy: a host check, no tensor op (tools/count_kernels.py counts those)
            lo, hi = int(perm.min()), int(perm.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"flip_perm: expected indices in [0, {k}), got values in [{lo}, {hi}]")


def _run(coords, scores, center, scale, crop_h, crop_w, rotation, flipped_coords, flipped_scores, flip_perm,
         backend: str, packed: bool = False) -> Tuple[Tensor, Tensor]:
    if backend == "triton":
        return _triton_module().regression_to_image(coords, scores, center, scale, (crop_h, crop_w), rotation,
                                                    flipped_coords, flipped_scores, flip_perm, packed=packed)
    return regression_to_image_reference(coords, scores, center, scale, (crop_h, crop_w), rotation,
                                         flipped_coords, flipped_scores, flip_perm)


@torch.library.custom_op("distilpose::regression_to_image", mutates_args=())
def _op(coords: Tensor, scores: Tensor, center: Tensor, scale: Tensor, crop_h: int, crop_w: int,
        rotation: Optional[Tensor], flipped_coords: Optional[Tensor], flipped_scores: Optional[Tensor],
        flip_perm: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "triton" and not coords.is_cuda and not triton_interpret():
        backend = "reference"
    kp, sc = _run(coords, scores, center, scale, crop_h, crop_w, rotation, flipped_coords, flipped_scores,
                  flip_perm, backend)
    return kp.contiguous(), sc.contiguous()


@_op.register_fake
def _(coords, scores, center, scale, crop_h, crop_w, rotation, flipped_coords, flipped_scores, flip_perm, backend):
    n, k, _ = coords.shape
    return coords.new_empty((n, k, 2), dtype=torch.float32), coords.new_empty((n, k), dtype=torch.float32)


@annotate("distilpose.regression_to_image")
def regression_to_image(
    coords: Tensor, scores: Tensor, center: Tensor, scale: Tensor, crop_size: Sequence[int],
    rotation: Optional[Tensor] = None, flipped_coords: Optional[Tensor] = None,
    flipped_scores: Optional[Tensor] = None, flip_perm: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Crop-normalised regression keypoints (and their flip-test twins) -> (keypoints (N, K, 2)
    image px fp32, scores (N, K) fp32) in one kernel; see the module docstring."""
    _check(coords, scores, center, scale, crop_size, rotation, flipped_coords, flipped_scores, flip_perm)
    crop_h, crop_w = (int(v) for v in crop_size)
    tensors = [t for t in (coords, scores, center, scale, rotation, flipped_coords, flipped_scores) if t is not None]
    which = select_triton_backend("regression_to_image", tensors, backend)
    if which == "reference" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return regression_to_image_reference(coords, scores, center, scale, (crop_h, crop_w), rotation,
                                             flipped_coords, flipped_scores, flip_perm)
    if torch.compiler.is_compiling():
        return tuple(_op(coords, scores, center, scale, crop_h, crop_w, rotation, flipped_coords, flipped_scores,
                         flip_perm, "triton"))
    # eager: the two outputs adjacent in one buffer (one host copy for both; the custom op above
    # returns them apart, as custom ops must)
    return _run(coords, scores, center, scale, crop_h, crop_w, rotation, flipped_coords, flipped_scores, flip_perm,
                "triton", packed=True)

