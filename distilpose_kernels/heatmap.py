"""Gaussian simulated heatmaps: Reg2HM and score losses, rendering, teacher targets.

Public ops (each with a pure-PyTorch reference; the fused path is Triton, in heatmap_triton.py):

- ``simulated_heatmap_loss(coords, sigma, score, teacher_heatmaps, keypoint_weight, mode)``
  -> (reg2hm_loss, score_loss): the student's losses 4 and 5 of the spec. The fused path reads
  the teacher heatmaps once in forward, never stores the Gaussians, and its backward reads
  only (N, K)-sized statistics saved by the forward.
- ``render_gaussian_heatmaps(mu, sigma, height, width)`` -> (N, K, H, W) Gaussian maps.
- ``gaussian_heatmap_targets(keypoints, visibility, input_size, heatmap_size, sigma, encoding)``
  -> (heatmaps, weights): the teacher's training targets (defined in targets.py).

Dispatch (``backend``): None/"auto" runs, on CUDA, the loss on the compiled extension's kernels
(distilpose::simhm_loss_ext, autograd in C++) when the extension is built with CUDA, else the
Triton kernels, and the reference elsewhere (DISTILPOSE_FORCE_REFERENCE=1 forces the
reference); "triton" forces the Triton kernels (on CPU only under TRITON_INTERPRET=1); "cuda" /
"cpp" force the extension's CUDA / CPU kernels (loss only); "reference" forces the reference.
The Triton kernels are registered as
``torch.library`` custom ops (distilpose::simhm_loss_fwd/_bwd, simhm_render_fwd/_bwd,
simhm_targets) with fake kernels and autograd, used under torch.compile (fullgraph, no graph
break); eager calls launch the same kernels through a torch.autograd.Function, which skips the
custom-op dispatch overhead (comparable to the kernels' own run time at the spec's sizes).
Shapes: N batch, K keypoints, H x W heatmap.
"""
from __future__ import annotations

import os as _os
from typing import Optional, Tuple

import torch
from torch import nn

from . import _ext
from ._utils import (agrees_at_dtype, annotate, decision_key, check_same_device, check_tensor, force_reference,
                     graph_timing, lazy_module, pdl_requested, select_triton_backend, timed_choice)

REG2HM_MODES = ("released", "per_sample")


def _float64_to_reference(be: str, backend: Optional[str], *predictions: torch.Tensor) -> str:
    """The kernels compute in fp32: "auto" keeps float64 predictions on the (float64) reference;
    an explicit backend="triton" still runs the kernels."""
    if be == "triton" and backend in (None, "auto") and any(t.dtype == torch.float64 for t in predictions):
        return "reference"
    return be


def _loss_inputs_ok(coords, sigma, score, teacher_heatmaps, keypoint_weight) -> bool:
    """Cheap all-valid test of the fused path's inputs (the per-call host time is the budget)."""
    try:
        if teacher_heatmaps.dim() != 4:
            return False
        n, k = teacher_heatmaps.shape[:2]
        dev = teacher_heatmaps.device
        return (
            coords.shape == (n, k, 2) and sigma.shape == (n, k, 2) and score.shape == (n, k, 1)
            and keypoint_weight.shape == (n, k, 1)
            and coords.dtype in _FLOATS and sigma.dtype in _FLOATS and score.dtype in _FLOATS
            and teacher_heatmaps.dtype in _FLOATS
            and coords.device == dev and sigma.device == dev and score.device == dev
            and keypoint_weight.device == dev
        )
    except AttributeError:  # not tensors: the full check names the argument
        return False


def _check_loss_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight):
    check_tensor("teacher_heatmaps", teacher_heatmaps, ndim=4, floating=True)
    n, k = teacher_heatmaps.shape[:2]
    check_tensor("coords", coords, shape=(n, k, 2), floating=True)
    check_tensor("sigma", sigma, shape=(n, k, 2), floating=True)
    if score is not None:
        check_tensor("score", score, shape=(n, k, 1), floating=True)
    check_tensor("keypoint_weight", keypoint_weight, shape=(n, k, 1))
    check_same_device(coords=coords, sigma=sigma, teacher_heatmaps=teacher_heatmaps, keypoint_weight=keypoint_weight)


def simulated_gaussians_reference(
    coords: torch.Tensor, sigma: torch.Tensor, height: int, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Simulated heatmaps of the spec, with the 3-sigma off-grid rule.

    coords: (N, K, 2) normalised (x, y); sigma: (N, K, 2) in heatmap pixels.
    Returns (maps (N, K, H, W), in_grid (N, K, 1) float mask). Maps of keypoints whose
    box [mu - 3 sigma, mu + 3 sigma + 1] lies wholly outside the grid are zero.
    """
    mu_x = coords[..., 0] * width
    mu_y = coords[..., 1] * height
    sx, sy = sigma[..., 0], sigma[..., 1]
    with torch.no_grad():
        ul_x, ul_y = mu_x - 3 * sx, mu_y - 3 * sy
        br_x, br_y = mu_x + 3 * sx + 1, mu_y + 3 * sy + 1
        off = (ul_x >= width) | (ul_y >= height) | (br_x < 0) | (br_y < 0)
        in_grid = (~off).to(coords.dtype).unsqueeze(-1)
    xs = torch.arange(width, device=coords.device, dtype=coords.dtype)
    ys = torch.arange(height, device=coords.device, dtype=coords.dtype)
    dx2 = (xs.view(1, 1, 1, width) - mu_x[..., None, None]) ** 2 / (sx[..., None, None] ** 2 + 1e-9)
    dy2 = (ys.view(1, 1, height, 1) - mu_y[..., None, None]) ** 2 / (sy[..., None, None] ** 2 + 1e-9)
    maps = torch.exp(-(dx2 + dy2) / 2) * in_grid[..., None]
    return maps, in_grid


def reg2hm_loss_reference(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
) -> torch.Tensor:
    """Simulated-heatmap (Reg2HM) loss, pure PyTorch.

    mode="released": (1/K) sum_k mean_i(w_ik^2) * mean_{j,pixels}(g_jk - T_jk)^2, the
    broadcast the authors' code computes (and that produced the paper's numbers).
    mode="per_sample": (1/K) sum_k mean_{i,pixels}(w_ik (g_ik - T_ik))^2.
    w = keypoint_weight * in_grid. No gradient reaches the teacher heatmaps. Returns coords.dtype.
    """
    if mode not in REG2HM_MODES:
        raise ValueError(f"mode: expected one of {REG2HM_MODES}, got {mode!r}")
    _check_loss_inputs(coords, sigma, None, teacher_heatmaps, keypoint_weight)
    h, w_ = teacher_heatmaps.shape[-2:]
    g, in_grid = simulated_gaussians_reference(coords, sigma, h, w_)
    t = teacher_heatmaps.detach().to(g.dtype)
    w = keypoint_weight.to(g.dtype) * in_grid  # (N, K, 1)
    if mode == "released":
        per_joint_map = ((g - t) ** 2).mean(dim=(0, 2, 3))  # (K,)
        per_joint_w = (w[..., 0] ** 2).mean(dim=0)  # (K,)
        loss = (per_joint_w * per_joint_map).mean()
    else:
        loss = ((w[..., None] * (g - t)) ** 2).mean()
    return loss.to(coords.dtype)  # coords.dtype, as the fused path (math in the promoted dtype)


def teacher_value_at_prediction(coords: torch.Tensor, teacher_heatmaps: torch.Tensor) -> torch.Tensor:
    """Teacher heatmap value at the nearest pixel of the prediction, 0 outside [0, 1]. -> (N, K, 1)."""
    n, k, h, w = teacher_heatmaps.shape
    c = coords.detach()
    if c.dtype in (torch.float16, torch.bfloat16):  # the index product in fp32, as the kernel (not rounded to 16 bits)
        c = c.float()
    inside = (c >= 0).all(-1) & (c <= 1).all(-1)
    c = torch.where(inside[..., None], c, torch.zeros_like(c))  # NaN (outside) must not reach the index
    px = torch.round(c[..., 0] * (w - 1)).long()
    py = torch.round(c[..., 1] * (h - 1)).long()
    flat = teacher_heatmaps.detach().reshape(n, k, h * w)
    val = flat.gather(2, (py * w + px).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, val, torch.zeros_like(val)).unsqueeze(-1)


def score_loss_reference(
    coords: torch.Tensor, score: torch.Tensor, teacher_heatmaps: torch.Tensor, keypoint_weight: torch.Tensor
) -> torch.Tensor:
    """Score loss: L1 (mean) between score*w and the teacher value at the predicted pixel *w."""
    check_tensor("score", score)
    _check_loss_inputs(coords, coords, score, teacher_heatmaps, keypoint_weight)
    target = teacher_value_at_prediction(coords, teacher_heatmaps).to(score.dtype)
    w = keypoint_weight.to(score.dtype)
    return (score * w - target * w).abs().mean()


def simulated_heatmap_loss_reference(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    score: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Reg2HM loss, score loss), both unweighted scalars. See the two functions above."""
    _check_loss_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight)
    return (
        reg2hm_loss_reference(coords, sigma, teacher_heatmaps, keypoint_weight, mode),
        score_loss_reference(coords, score, teacher_heatmaps, keypoint_weight),
    )



# ============================================================================ fused path

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: the Triton kernels module (imports triton: loaded only on the Triton path)
_kernels = lazy_module("distilpose_kernels.heatmap_triton")


# --------------------------------------------------------------- loss: custom ops


@torch.library.custom_op("distilpose::simhm_loss_fwd", mutates_args=())
def _simhm_loss_fwd(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    score: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    released: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (reg2hm (), score_loss (), stats (8, N, K) fp32, per-joint sum_i w_ik^2 (K,) fp32)."""
    return _kernels().simhm_loss_fwd(coords, sigma, score, teacher_heatmaps, keypoint_weight, released)


@_simhm_loss_fwd.register_fake
def _loss_fwd_fake(coords, sigma, score, teacher_heatmaps, keypoint_weight, released):
    n, k = teacher_heatmaps.shape[:2]
    return (
        coords.new_empty(()),
        score.new_empty(()),
        coords.new_empty((8, n, k), dtype=torch.float32),
        coords.new_empty((k,), dtype=torch.float32),
    )


@torch.library.custom_op("distilpose::simhm_loss_bwd", mutates_args=())
def _simhm_loss_bwd(
    grad_reg2hm: torch.Tensor,
    grad_score_loss: torch.Tensor,
    stats: torch.Tensor,
    joint_w2: torch.Tensor,
    coords_dtype: torch.dtype,
    sigma_dtype: torch.dtype,
    score_dtype: torch.dtype,
    hw: int,
    released: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_coords (N, K, 2), grad_sigma (N, K, 2), grad_score (N, K, 1))."""
    return _kernels().simhm_loss_bwd(
        grad_reg2hm, grad_score_loss, stats, joint_w2, coords_dtype, sigma_dtype, score_dtype, hw, released
    )


@_simhm_loss_bwd.register_fake
def _loss_bwd_fake(grad_reg2hm, grad_score_loss, stats, joint_w2, coords_dtype, sigma_dtype, score_dtype, hw, released,
                   pdl=False):
    _, n, k = stats.shape
    return (
        stats.new_empty((n, k, 2), dtype=coords_dtype),
        stats.new_empty((n, k, 2), dtype=sigma_dtype),
        stats.new_empty((n, k, 1), dtype=score_dtype),
    )


def _simhm_loss_setup(ctx, inputs, output):
    coords, sigma, score, teacher, _, released = inputs
    _, _, stats, joint_w2 = output
    ctx.save_for_backward(stats, joint_w2)
    ctx.dtypes = (coords.dtype, sigma.dtype, score.dtype)
    ctx.hw = teacher.shape[-2] * teacher.shape[-1]
    ctx.released = released


def _simhm_loss_grads(ctx, grad_reg, grad_score, bwd):
    stats, joint_w2 = ctx.saved_tensors
    if grad_reg is None:
        grad_reg = stats.new_zeros(())
    if grad_score is None:
        grad_score = stats.new_zeros(())
    g_coords, g_sigma, g_score = bwd(grad_reg, grad_score, stats, joint_w2, *ctx.dtypes, ctx.hw, ctx.released)
    need = ctx.needs_input_grad
    return (
        g_coords if need[0] else None,
        g_sigma if need[1] else None,
        g_score if need[2] else None,
        None,
        None,
        None,
    )


def _simhm_loss_backward(ctx, grad_reg, grad_score, _grad_stats, _grad_w2):
    return _simhm_loss_grads(ctx, grad_reg, grad_score, _simhm_loss_bwd)


_simhm_loss_fwd.register_autograd(_simhm_loss_backward, setup_context=_simhm_loss_setup)


class _SimHMLossFunction(torch.autograd.Function):
    """Eager fast path: the same kernels without the custom-op dispatch overhead (tens of us per
    call, comparable to the kernels themselves). Under torch.compile the custom op is used."""

    @staticmethod
    def forward(ctx, coords, sigma, score, teacher_heatmaps, keypoint_weight, released):
        out = _kernels().simhm_loss_fwd(coords, sigma, score, teacher_heatmaps, keypoint_weight, released)
        _simhm_loss_setup(ctx, (coords, sigma, score, teacher_heatmaps, keypoint_weight, released), out)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_reg, grad_score):
        return _simhm_loss_grads(ctx, grad_reg, grad_score, _kernels().simhm_loss_bwd)


# --------------------------------------------------------------- loss: the compiled extension
#
# distilpose::simhm_loss_ext: the same statistics and gradients as the Triton kernels, from the
# C++/CUDA extension (csrc/cpu/simhm_loss_cpu.cpp, csrc/cuda/simhm_loss_cuda.cu), with its
# autograd in C++ (csrc/simhm_loss_autograd.cpp): an eager call is one dispatcher call, with
# no Python in its forward or backward. The schemas live here (like the decode ops'), so they
# and their fake kernels exist whether or not the extension was built.

_ext_lib = torch.library.Library("distilpose", "FRAGMENT")
_ext_lib.define(
    "simhm_loss_ext_fwd(Tensor coords, Tensor sigma, Tensor score, Tensor teacher_heatmaps, "
    "Tensor keypoint_weight, bool released, int fwd_kernel=0, bool pdl=False) "
    "-> (Tensor reg2hm, Tensor score_loss, Tensor stats, Tensor joint_w2)"
)
_ext_lib.define(
    "simhm_loss_ext_bwd(Tensor grad_reg2hm, Tensor grad_score_loss, Tensor stats, Tensor joint_w2, "
    "ScalarType coords_dtype, ScalarType sigma_dtype, ScalarType score_dtype, int hw, bool released, "
    "bool pdl=False) -> (Tensor grad_coords, Tensor grad_sigma, Tensor grad_score)"
)
_ext_lib.define(
    "simhm_loss_ext(Tensor coords, Tensor sigma, Tensor score, Tensor teacher_heatmaps, "
    "Tensor keypoint_weight, bool released, int fwd_kernel=0, bool pdl=False) -> (Tensor reg2hm, Tensor score_loss)"
)


# the same contract as the Triton ops: the same fake kernels
@torch.library.register_fake("distilpose::simhm_loss_ext_fwd", lib=_ext_lib)
def _(coords, sigma, score, teacher_heatmaps, keypoint_weight, released, fwd_kernel=0, pdl=False):
    return _loss_fwd_fake(coords, sigma, score, teacher_heatmaps, keypoint_weight, released)


torch.library.register_fake("distilpose::simhm_loss_ext_bwd", _loss_bwd_fake, lib=_ext_lib)


@torch.library.register_fake("distilpose::simhm_loss_ext", lib=_ext_lib)
def _(coords, sigma, score, teacher_heatmaps, keypoint_weight, released, fwd_kernel=0, pdl=False):
    return coords.new_empty(()), score.new_empty(())


_EXT_LOSS_OPS = ("simhm_loss_ext_fwd", "simhm_loss_ext_bwd", "simhm_loss_ext")
_ext.load()  # registers the compiled kernels, if built (as decode.py does)
_ext_loss_op = []  # [torch.ops.distilpose.simhm_loss_ext.default], resolved on first use


def extension_loss_available(device_type: str) -> bool:
    """Whether the compiled extension serves ``simulated_heatmap_loss`` on ``device_type``
    ("cpu" or "cuda"): built for that device and new enough to carry the loss ops."""
    return _ext.available(device_type, _EXT_LOSS_OPS)


def _ext_loss():
    if not _ext_loss_op:
        _ext_loss_op.append(torch.ops.distilpose.simhm_loss_ext.default)
    return _ext_loss_op[0]


#: the extension's CUDA forward kernels (``fwd_kernel`` of distilpose::simhm_loss_ext, in this
#: order): one block per map; persistent blocks holding the next map in registers; persistent
#: blocks streaming maps through shared memory with asynchronous copies
SIMHM_FWD_KERNELS = ("blocks", "persistent", "pipelined")
SIMHM_FWD_ENV = "DISTILPOSE_SIMHM_FWD"
_FWD_TIMED_DEVICES = ("cuda",)  # where the CUDA forwards exist (tests add "cpu")
_FWD_KERNEL_CHOICES: dict = {}  # timed_choice cache: (N*K, H, W, dtype, device, candidate, incumbent) -> bool


def _ext_fwd_kernel(coords, sigma, score, teacher_heatmaps, kw, released: bool) -> int:
    """The extension's CUDA forward kernel for this call (an index into SIMHM_FWD_KERNELS).

    DISTILPOSE_SIMHM_FWD names one ("blocks", "persistent", "pipelined"); "auto" (the default)
    times them once per (N*K, H, W, teacher dtype, device), outside CUDA-graph capture, on this
    call's inputs: persistent against blocks, then pipelined against the winner, each kept only
    if its statistics agree (``timed_choice``; ``auto_choices`` records the decisions). Before a
    decision exists inside a capture, "blocks" runs. Under torch.compile "blocks" runs (nothing
    is timed or looked up while tracing). The CPU kernels ignore the choice."""
    if torch.compiler.is_compiling():
        return 0
    forced = _forced_fwd_kernel()
    if forced is not None:
        return forced
    if teacher_heatmaps.device.type not in _FWD_TIMED_DEVICES:
        return 0
    decided = _decided_fwd_kernel(_fwd_kernel_key(teacher_heatmaps), graph_timing())
    if decided is not None:  # the common case: lookups only (an eager call's time is host time)
        return decided
    return _timed_fwd_kernel((coords.detach(), sigma.detach(), score.detach(), teacher_heatmaps, kw, released))


def _forced_fwd_kernel() -> Optional[int]:
    """The forward kernel DISTILPOSE_SIMHM_FWD names (an index into SIMHM_FWD_KERNELS), None for
    "auto"; any other value is an error naming the variable."""
    choice = _os.environ.get(SIMHM_FWD_ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        return None
    if choice not in SIMHM_FWD_KERNELS:
        raise ValueError(f"{SIMHM_FWD_ENV}: expected one of auto, {', '.join(SIMHM_FWD_KERNELS)}, got {choice!r}")
    return SIMHM_FWD_KERNELS.index(choice)


def _fwd_kernel_key(teacher: torch.Tensor) -> tuple:
    n, k, h, w = teacher.shape
    return (n * k, h, w, teacher.dtype, teacher.device.type, teacher.device.index)


def chosen_fwd_kernel(teacher_heatmaps: torch.Tensor) -> Optional[str]:
    """The CUDA forward kernel that ``simulated_heatmap_loss`` runs for teachers of this shape,
    dtype and device: the one DISTILPOSE_SIMHM_FWD names, else the "auto" decision already made
    (per call, or on device time for CUDA graphs, the latter preferred); None when undecided.
    Times nothing (for reports)."""
    forced = _forced_fwd_kernel()
    if forced is not None:
        return SIMHM_FWD_KERNELS[forced]
    key = _fwd_kernel_key(teacher_heatmaps)
    for device_time in (True, False):
        best = _decided_fwd_kernel(key, device_time)
        if best is not None:
            return SIMHM_FWD_KERNELS[best]
    return None


def _decided_fwd_kernel(key: tuple, device_time: bool) -> Optional[int]:
    """The tournament's winner for ``key`` (``_fwd_kernel_key``) from the cached decisions of one
    timing mode, None while a round is undecided. Times nothing."""
    best = 0
    for cand in (1, 2):
        decided = _FWD_KERNEL_CHOICES.get(decision_key(key + (cand, best), device_time))
        if decided is None:
            return None
        best = cand if decided else best
    return best


def _timed_fwd_kernel(args: tuple, op=None) -> int:
    """The tournament of ``_ext_fwd_kernel`` on the forward op's ``args`` (cached per shape)."""
    key = _fwd_kernel_key(args[3])
    op = op or torch.ops.distilpose.simhm_loss_ext_fwd.default

    def run(kernel: int):
        return lambda: op(*args, kernel)

    best = 0
    for cand in (1, 2):
        if timed_choice(_FWD_KERNEL_CHOICES, key + (cand, best), run(cand), run(best), _fwd_stats_agree,
                        f"simulated_heatmap_loss: the {SIMHM_FWD_KERNELS[cand]} CUDA forward "
                        f"(vs {SIMHM_FWD_KERNELS[best]})"):
            best = cand
    return best


def _fwd_stats_agree(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """The forward kernels differ only in their fp32 summation order."""
    return agrees_at_dtype(got, ref, 1e-3, 1e-5)


_LOSS_BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


def _loss_backend(coords, sigma, score, teacher_heatmaps, keypoint_weight, backend: Optional[str]) -> str:
    """"reference", "triton" or "extension" for the loss (``backend`` as in simulated_heatmap_loss)."""
    if backend is not None and backend not in _LOSS_BACKENDS:
        raise ValueError(f"simulated_heatmap_loss: backend must be None or one of {_LOSS_BACKENDS}, got {backend!r}")
    tensors = (coords, sigma, score, teacher_heatmaps, keypoint_weight)
    if backend in ("cpp", "cuda"):
        names = ("coords", "sigma", "score", "teacher_heatmaps", "keypoint_weight")
        _ext.require("simulated_heatmap_loss", backend, dict(zip(names, tensors)), _EXT_LOSS_OPS)
        return "extension"
    if backend in (None, "auto") and teacher_heatmaps.is_cuda and extension_loss_available("cuda") and \
            not force_reference() and torch.float64 not in (coords.dtype, sigma.dtype, score.dtype):
        return "extension"  # on CUDA the extension's path: the same math, no Python per call
    be = select_triton_backend("simulated_heatmap_loss", tensors, backend)
    return _float64_to_reference(be, backend, coords, sigma, score)


# --------------------------------------------------------------- loss: public API


@annotate("distilpose.simulated_heatmap_loss")
def simulated_heatmap_loss(
    coords: torch.Tensor,
    sigma: torch.Tensor,
    score: torch.Tensor,
    teacher_heatmaps: torch.Tensor,
    keypoint_weight: torch.Tensor,
    mode: str = "released",
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reg2HM and score losses of DistilPose (spec, student losses 4 and 5), unweighted scalars.

    coords: (N, K, 2) normalised (x / W_in, y / H_in), sigma: (N, K, 2) heatmap pixels,
    score: (N, K, 1), teacher_heatmaps: (N, K, H, W) (fp32/fp16/bf16, never differentiated),
    keypoint_weight: (N, K, 1) (a target: no gradient is returned for it on the fused path).
    mode: "released" (default, the authors' broadcast form that produced the paper's numbers)
    or "per_sample" (the evidently intended form); see ``reg2hm_loss_reference``.
    Returns (reg2hm_loss in coords.dtype, score_loss in score.dtype). Gradients flow to coords,
    sigma and score; the 3-sigma off-grid mask and the score's gather index are constants.
    The fused paths accumulate in fp32 ("auto" runs the reference for float64 predictions);
    NaN/inf inputs propagate into the losses (not checked). backend: None/"auto", "triton",
    "cuda" / "cpp" (the compiled extension) or "reference" (module docstring).
    """
    if mode not in REG2HM_MODES:
        raise ValueError(f"mode: expected one of {REG2HM_MODES}, got {mode!r}")
    valid = _loss_inputs_ok(coords, sigma, score, teacher_heatmaps, keypoint_weight)
    if not valid:  # raises the error that names the argument, or passes for reference-only dtypes
        check_tensor("score", score)  # _check_loss_inputs skips a None score
        _check_loss_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight)
        check_same_device(coords=coords, score=score)
    if teacher_heatmaps.numel() == 0:
        raise ValueError(f"teacher_heatmaps: expected a non-empty (N, K, H, W) tensor, got {tuple(teacher_heatmaps.shape)}")
    be = _loss_backend(coords, sigma, score, teacher_heatmaps, keypoint_weight, backend)
    if be == "reference":
        return simulated_heatmap_loss_reference(coords, sigma, score, teacher_heatmaps, keypoint_weight, mode)
    if not valid:
        for name, t in (("coords", coords), ("sigma", sigma), ("score", score), ("teacher_heatmaps", teacher_heatmaps)):
            check_tensor(name, t, dtypes=_FLOATS)
    kw = keypoint_weight.detach()
    if kw.dtype not in _FLOATS:
        kw = kw.to(torch.float32)
    if be == "extension":
        teacher = teacher_heatmaps.detach()
        released = mode == "released"
        return _ext_loss()(coords, sigma, score, teacher, kw, released,
                           _ext_fwd_kernel(coords, sigma, score, teacher, kw, released),
                           not torch.compiler.is_compiling() and pdl_requested())
    args = (
        coords.contiguous(),
        sigma.contiguous(),
        score.contiguous(),
        teacher_heatmaps.detach().contiguous(),
        kw.contiguous(),
        mode == "released",
    )
    if torch.compiler.is_compiling():
        reg, sl, _, _ = _simhm_loss_fwd(*args)
        return reg, sl
    return _SimHMLossFunction.apply(*args)


class SimulatedHeatmapLoss(nn.Module):
    """Module form of ``simulated_heatmap_loss``: forward(coords, sigma, score, teacher, weight) -> (reg2hm, score)."""

    def __init__(self, mode: str = "released", backend: Optional[str] = None):
        super().__init__()
        if mode not in REG2HM_MODES:
            raise ValueError(f"mode: expected one of {REG2HM_MODES}, got {mode!r}")
        self.mode = mode
        self.backend = backend

    def forward(self, coords, sigma, score, teacher_heatmaps, keypoint_weight):
        return simulated_heatmap_loss(
            coords, sigma, score, teacher_heatmaps, keypoint_weight, mode=self.mode, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, backend={self.backend!r}"


# --------------------------------------------------------------- rendering


def render_gaussian_heatmaps_reference(
    mu: torch.Tensor, sigma: torch.Tensor, height: int, width: int, mask_off_grid: bool = False
) -> torch.Tensor:
    """Pure-PyTorch rendering (see ``render_gaussian_heatmaps``); differentiable by autograd."""
    mu_x, mu_y = mu[..., 0], mu[..., 1]
    sx, sy = sigma[..., 0], sigma[..., 1]
    xs = torch.arange(width, device=mu.device, dtype=mu.dtype)
    ys = torch.arange(height, device=mu.device, dtype=mu.dtype)
    dx2 = (xs.view(1, 1, 1, width) - mu_x[..., None, None]) ** 2 / (sx[..., None, None] ** 2 + 1e-9)
    dy2 = (ys.view(1, 1, height, 1) - mu_y[..., None, None]) ** 2 / (sy[..., None, None] ** 2 + 1e-9)
    maps = torch.exp(-(dx2 + dy2) / 2)
    if mask_off_grid:
        with torch.no_grad():
            off = (
                (mu_x - 3 * sx >= width) | (mu_y - 3 * sy >= height) | (mu_x + 3 * sx + 1 < 0) | (mu_y + 3 * sy + 1 < 0)
            )
        maps = maps * (~off).to(maps.dtype)[..., None, None]
    return maps.to(mu.dtype)  # mu.dtype, as the fused path (math in the promoted dtype)


@torch.library.custom_op("distilpose::simhm_render_fwd", mutates_args=())
def _simhm_render_fwd(mu: torch.Tensor, sigma: torch.Tensor, height: int, width: int, mask_off_grid: bool) -> torch.Tensor:
    return _kernels().render_fwd(mu, sigma, height, width, mask_off_grid)


@_simhm_render_fwd.register_fake
def _(mu, sigma, height, width, mask_off_grid):
    return mu.new_empty((mu.shape[0], mu.shape[1], height, width))


@torch.library.custom_op("distilpose::simhm_render_bwd", mutates_args=())
def _simhm_render_bwd(
    grad: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mask_off_grid: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().render_bwd(grad, mu, sigma, mask_off_grid)


@_simhm_render_bwd.register_fake
def _(grad, mu, sigma, mask_off_grid):
    return torch.empty_like(mu), torch.empty_like(sigma)


def _render_setup(ctx, inputs, output):
    mu, sigma, _, _, mask_off_grid = inputs
    ctx.save_for_backward(mu, sigma)
    ctx.mask_off_grid = mask_off_grid


def _render_backward(ctx, grad):
    mu, sigma = ctx.saved_tensors
    g_mu, g_sigma = _simhm_render_bwd(grad.contiguous(), mu, sigma, ctx.mask_off_grid)
    need = ctx.needs_input_grad
    return (g_mu if need[0] else None, g_sigma if need[1] else None, None, None, None)


_simhm_render_fwd.register_autograd(_render_backward, setup_context=_render_setup)


class _RenderFunction(torch.autograd.Function):
    """Eager fast path of the rendering op (see _SimHMLossFunction)."""

    @staticmethod
    def forward(ctx, mu, sigma, height, width, mask_off_grid):
        ctx.save_for_backward(mu, sigma)
        ctx.mask_off_grid = mask_off_grid
        return _kernels().render_fwd(mu, sigma, height, width, mask_off_grid)

    @staticmethod
    def backward(ctx, grad):
        mu, sigma = ctx.saved_tensors
        g_mu, g_sigma = _kernels().render_bwd(grad.contiguous(), mu, sigma, ctx.mask_off_grid)
        need = ctx.needs_input_grad
        return (g_mu if need[0] else None, g_sigma if need[1] else None, None, None, None)


@annotate("distilpose.render_gaussian_heatmaps")
def render_gaussian_heatmaps(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    height: int,
    width: int,
    mask_off_grid: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Unnormalised 2-D Gaussian maps, the spec's simulated-heatmap formula.

    mu: (N, K, 2) centres (x, y) in HEATMAP PIXELS (pixel (i, j) is at x = j, y = i, no half-pixel
    shift); sigma: (N, K, 2) (sigma_x, sigma_y) in heatmap pixels.
    Returns (N, K, height, width) in mu.dtype (fp32 kernel math; "auto" runs the reference for
    float64) with
    ``g = exp(-((x - mu_x)^2 / (sigma_x^2 + 1e-9) + (y - mu_y)^2 / (sigma_y^2 + 1e-9)) / 2)``,
    peak 1, on the whole grid (no truncation). ``mask_off_grid=True`` zeroes the maps whose
    3-sigma box [mu - 3 sigma, mu + 3 sigma + 1] lies wholly outside the grid, as the
    Reg2HM loss does (the mask carries no gradient). Differentiable w.r.t. mu and sigma.
    From the student's normalised coords: ``mu = coords * coords.new_tensor([width, height])``.
    """
    check_tensor("mu", mu, ndim=3, floating=True)
    check_tensor("sigma", sigma, shape=tuple(mu.shape), floating=True)
    if mu.shape[-1] != 2:
        raise ValueError(f"mu: expected shape (N, K, 2), got {tuple(mu.shape)}")
    check_same_device(mu=mu, sigma=sigma)
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    be = select_triton_backend("render_gaussian_heatmaps", (mu, sigma), backend)
    be = _float64_to_reference(be, backend, mu, sigma)
    if be == "reference":
        return render_gaussian_heatmaps_reference(mu, sigma, height, width, mask_off_grid)
    check_tensor("mu", mu, dtypes=_FLOATS)
    check_tensor("sigma", sigma, dtypes=_FLOATS)
    args = (mu.contiguous(), sigma.contiguous(), height, width, bool(mask_off_grid))
    if torch.compiler.is_compiling():
        return _simhm_render_fwd(*args)
    return _RenderFunction.apply(*args)


class GaussianHeatmapRenderer(nn.Module):
    """Module form of ``render_gaussian_heatmaps`` for a fixed (height, width)."""

    def __init__(self, height: int, width: int, mask_off_grid: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.height, self.width = int(height), int(width)
        self.mask_off_grid = bool(mask_off_grid)
        self.backend = backend

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return render_gaussian_heatmaps(mu, sigma, self.height, self.width, self.mask_off_grid, self.backend)

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}, mask_off_grid={self.mask_off_grid}"


@annotate("distilpose.joint_mse_loss")
def joint_mse_loss(pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """Per-joint weighted heatmap MSE (the teacher's loss, mmpose JointsMSELoss with target weight).

    pred, target: (N, K, H, W); target_weight: (N, K, 1).
    L = (1/K) sum_k mean_{i, pixels} (w_ik (pred_ik - target_ik))^2.
    """
    check_tensor("pred", pred, ndim=4, floating=True)
    check_tensor("target", target, shape=tuple(pred.shape))
    check_tensor("target_weight", target_weight, shape=(pred.shape[0], pred.shape[1], 1))
    w = target_weight.to(pred.dtype)[..., None]
    return ((w * (pred - target.to(pred.dtype))) ** 2).mean()


# Teacher training targets live in targets.py; re-exported here (public name: heatmap module).
from .targets import (  # noqa: E402
    TARGET_ENCODINGS,
    GaussianHeatmapTargets,
    gaussian_heatmap_targets,
    gaussian_heatmap_targets_reference,
)
