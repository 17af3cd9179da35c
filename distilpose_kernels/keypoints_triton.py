"""Triton kernel for ``regression_to_image`` (imported only when the Triton path runs)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_helpers import pdl_enter
from ._utils import cdiv, pdl_launch

#: output allocator (tests swap in a NaN-filled one)
_new_output = torch.empty
BLOCK = 128


@triton.jit
def _regression_to_image_kernel(
    C, S, FC, FS, PERM, CEN, SCA, ROT, KP, SC,
    NK, K, crop_w, crop_h,
    scn, sck, scd, ssn, ssk, sfn, sfk, sfd, sgn, sgk, spk, sen, sed, san, sad, srn,
    FLIP: tl.constexpr, HAS_ROT: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One lane per (n, k): flip-test merge, crop pixels, inverse affine (fp32)."""
    pdl_enter(USE_PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < NK
    n = (i // K).to(tl.int64)
    k = i % K
    cx = tl.load(C + n * scn + k * sck, mask=ok, other=0.0).to(tl.float32)
    cy = tl.load(C + n * scn + k * sck + scd, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(S + n * ssn + k * ssk, mask=ok, other=0.0).to(tl.float32)
    if FLIP:
        j = tl.load(PERM + k * spk, mask=ok, other=0).to(tl.int64)
        jok = ok & (j >= 0) & (j < K)  # an index outside [0, K) reads nothing: NaN for that keypoint
        fx = tl.load(FC + n * sfn + j * sfk, mask=jok, other=float("nan")).to(tl.float32)
        fy = tl.load(FC + n * sfn + j * sfk + sfd, mask=jok, other=float("nan")).to(tl.float32)
        fs = tl.load(FS + n * sgn + j * sgk, mask=jok, other=float("nan")).to(tl.float32)
        cx = (cx + (1.0 - fx)) * 0.5
        cy = (cy + fy) * 0.5
        s = (s + fs) * 0.5
    wf = crop_w * 1.0
    hf = crop_h * 1.0
    # crop pixels, then the inverse of the crop's affine: same op order as the reference
    vx = (cx * wf - wf / 2.0) * (tl.load(SCA + n * san, mask=ok, other=0.0).to(tl.float32) / wf)
    vy = (cy * hf - hf / 2.0) * (tl.load(SCA + n * san + sad, mask=ok, other=0.0).to(tl.float32) / hf)
    if HAS_ROT:
        r = tl.load(ROT + n * srn, mask=ok, other=0.0).to(tl.float32) * 0.017453292519943295
        cr = tl.cos(r)
        sr = tl.sin(r)
        vx, vy = cr * vx - sr * vy, sr * vx + cr * vy
    ox = vx + tl.load(CEN + n * sen, mask=ok, other=0.0).to(tl.float32)
    oy = vy + tl.load(CEN + n * sen + sed, mask=ok, other=0.0).to(tl.float32)
    tl.store(KP + 2 * i, ox, mask=ok)
    tl.store(KP + 2 * i + 1, oy, mask=ok)
    tl.store(SC + i, s, mask=ok)


def regression_to_image(coords, scores, center, scale, crop_size: Tuple[int, int], rotation: Optional[torch.Tensor],
                        flipped_coords, flipped_scores, flip_perm, packed: bool = False):
    """-> (keypoints (N, K, 2) fp32, scores (N, K) fp32); inputs through their strides.
    ``packed``: both outputs are views of one buffer, the scores right after the keypoints (a
    caller can copy them to the host in one transfer); not for custom ops, whose outputs must
    not share storage."""
    n, k, _ = coords.shape
    if packed:
        buf = _new_output((n * k * 3,), device=coords.device, dtype=torch.float32)
        kp, sc = buf[: n * k * 2].view(n, k, 2), buf[n * k * 2:].view(n, k)
    else:
        kp = _new_output((n, k, 2), device=coords.device, dtype=torch.float32)
        sc = _new_output((n, k), device=coords.device, dtype=torch.float32)
    if n * k == 0:
        return kp, sc
    flip = flipped_coords is not None
    fc = flipped_coords if flip else coords
    fs = flipped_scores if flip else scores
    rot = rotation if rotation is not None else center
    perm = flip_perm if flip else scores
    _regression_to_image_kernel[(cdiv(n * k, BLOCK),)](
        coords, scores, fc, fs, perm, center, scale, rot, kp, sc,
        n * k, k, int(crop_size[1]), int(crop_size[0]),
        *coords.stride(), *scores.stride(), *fc.stride(), *fs.stride(), perm.stride(0), *center.stride(),
        *scale.stride(), rot.stride(0),
        FLIP=flip, HAS_ROT=rotation is not None, BLOCK=BLOCK, **pdl_launch(coords.device),
    )
    return kp, sc
