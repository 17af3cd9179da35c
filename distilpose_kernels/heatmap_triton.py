"""Triton kernels for Gaussian simulated heatmaps (imported only when the Triton path runs).

Kernels:
- ``_simhm_loss_fwd_kernel``: one program per (n, k), ONE pass over the teacher heatmap.
  Renders the simulated Gaussian on the fly (never stored), accumulates the squared error
  S_nk = sum_p (g - T)^2 and the four gradient moments sum (g-T) g dx, ..dy, ..dx^2, ..dy^2,
  and gathers the teacher value at the predicted pixel for the score loss.
- ``_simhm_loss_fwd_whole_kernel``: the same statistics for maps that fit one tile, one or two
  maps per program, the tile loads placed before any arithmetic. On a GPU the forward's launch shape
  (``LossTile``: kernel, tile, warps) is timed once per shape class and the fastest kept.
- ``_simhm_loss_finalize_kernel``: one program; combines the per-(n, k) statistics into the
  Reg2HM loss (released or per-sample form) and the score loss.
- ``_simhm_loss_bwd_kernel``: elementwise over (n, k); scales the saved derivatives. The
  backward never reads the teacher again.
- ``_render_fwd_kernel`` / ``_render_bwd_kernel``: Gaussian maps and their gradient.
- ``_targets_kernel``: teacher training targets (msra / unbiased / udp), encoding parameters
  computed in-kernel, every output element written.

All accumulation is fp32 whatever the storage dtype. Offsets into the (N, K, H, W) tensors are
64-bit.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import cdiv, env_switch, next_pow2, triton_interpret

# Rows of the (8, N, K) fp32 statistics buffer of the loss.
ST_S, ST_DCX, ST_DCY, ST_DSX, ST_DSY, ST_WREG, ST_ERR, ST_WSCORE = range(8)
NUM_STATS = 8

_INTERPRET = triton_interpret()
#: Set DISTILPOSE_HEATMAP_AUTOTUNE=0 to use the fixed heuristic tile of the loss forward on GPU too.
AUTOTUNE = (not _INTERPRET) and env_switch("DISTILPOSE_HEATMAP_AUTOTUNE", True)
#: Tests set a LossTile here to run the loss forward with it.
TILE_OVERRIDE: Optional["LossTile"] = None
#: tuned loss-forward tile per (H, W, teacher dtype, pow2 bucket of N*K, device index)
_TUNED_TILES: dict = {}

#: Allocator for kernel outputs (tests replace it with a NaN-filling one to check that
#: every element is written by the kernels).
_alloc = torch.empty


def _block(n: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, next_pow2(n)))


@functools.lru_cache(maxsize=256)
def _tile(h: int, w: int, elems: int = 1024) -> tuple:
    """2-D tile (BLOCK_H, BLOCK_W, num_warps) of about ``elems`` pixels: whole rows when W <= 256."""
    bw = _block(w, 16, 256)
    bh = max(1, min(next_pow2(h), elems // bw))
    return bh, bw, 4 if bh * bw >= 512 else 2


class LossTile(NamedTuple):
    """Launch shape of the loss forward.

    maps == 0: ``_simhm_loss_fwd_kernel``, one map per program swept in [block_h, block_w]
    tiles (the kernel of the H200 runs). maps 1 or 2: ``_simhm_loss_fwd_whole_kernel``, whole
    maps in one tile (block_h >= H, block_w >= W), ``maps`` per program.
    """

    maps: int
    block_h: int
    block_w: int
    num_warps: int


@functools.lru_cache(maxsize=256)
def default_loss_tile(h: int, w: int) -> LossTile:
    return LossTile(0, *_tile(h, w))


@functools.lru_cache(maxsize=256)
def tile_candidates(h: int, w: int) -> tuple:
    """The LossTiles the loss forward is tuned over, the default first.

    Looping kernel: whole rows (block_w >= W) or narrow column strips (16, 32: no masked
    lanes when W is a multiple of them), 1024 to 4096 pixels per tile. Whole-map kernel, for
    maps of up to 8192 (one per program) or 4096 (two per program) padded pixels.
    """
    out = [default_loss_tile(h, w)]
    bw_full = _block(w, 16, 256)
    for bw in sorted({16, 32, bw_full}):
        if bw > bw_full:
            continue
        for elems, warps in ((1024, 4), (2048, 4), (4096, 8)):
            c = LossTile(0, max(1, min(next_pow2(h), elems // bw)), bw, warps)
            if c not in out:
                out.append(c)
    bh, bw = next_pow2(h), _block(w, 16, 1024)
    for maps, cap in ((1, 8192), (2, 4096)):  # whole maps per program: no loop, loads first
        if bh * bw <= cap:
            for warps in (4, 8, 16):
                if 32 * warps <= bh * bw:
                    out.append(LossTile(maps, bh, bw, warps))
    return tuple(out)


def _agrees(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Per statistic (row of the (8, N*K) buffer): equal up to fp32 summation order, NaN alike."""
    got, ref = got.reshape(NUM_STATS, -1), ref.reshape(NUM_STATS, -1)
    scale = ref.nan_to_num(0.0, 0.0, 0.0).abs().amax(dim=1, keepdim=True)
    close = (got - ref).abs() <= 1e-4 * ref.abs() + 1e-5 * scale
    return bool((close | (got == ref) | (ref.isnan() & got.isnan())).all())


def _tuned_tile(h: int, w: int, nk: int, dtype: torch.dtype, device: torch.device,
                run: Callable[[LossTile], None], result: Callable[[], torch.Tensor]) -> LossTile:
    """The loss forward's LossTile: the override, else the fastest candidate timed once per key
    on a GPU, else the default (interpreter, autotune off, or inside a CUDA-graph capture,
    where nothing may be timed).

    ``run(tile)`` launches the forward, ``result()`` returns (a copy of) the statistics it
    wrote. A candidate is adopted only if its statistics agree with the default kernel's on
    this input: the default is the kernel verified on a GPU, so a candidate that compiles to
    wrong code on some device or Triton version is skipped (with a warning), not used."""
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    default = default_loss_tile(h, w)
    if not AUTOTUNE or device.type != "cuda":
        return default
    key = (h, w, dtype, next_pow2(nk), device.index)
    cfg = _TUNED_TILES.get(key)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing():
        return default
    cands = tile_candidates(h, w)
    cfg = default
    try:
        from triton.testing import do_bench

        run(default)
        ref = result()
        times = [do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in cands]
        for i in sorted(range(len(cands)), key=times.__getitem__):
            if cands[i] == default:
                break
            run(cands[i])
            if _agrees(result(), ref):
                cfg = cands[i]
                break
            warnings.warn(f"simulated_heatmap_loss: launch shape {cands[i]} disagrees with the default kernel "
                          f"on this device; not used")
    except Exception as e:  # noqa: BLE001 - tuning is an optimisation: never fail the op for it
        warnings.warn(f"simulated_heatmap_loss: tile tuning failed ({type(e).__name__}: {e}); using the default tile")
        cfg = default
    _TUNED_TILES[key] = cfg
    return cfg


@functools.lru_cache(maxsize=256)
def _loss_plan(n: int, k: int) -> tuple:
    """(BLOCK_N, BLOCK_K) of the finalize kernel, (BLOCK, grid) of the backward kernel."""
    block_k = _block(k, 1, 1024)
    block_n = max(1, min(next_pow2(n), 4096 // block_k))
    block = _block(n * k, 64, 1024)
    return block_n, block_k, block, cdiv(n * k, block)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _in_grid(mux, muy, sx, sy, H, W):
    """1.0 unless the box [mu - 3 sigma, mu + 3 sigma + 1] lies wholly outside the grid."""
    ulx = mux - 3 * sx
    uly = muy - 3 * sy
    brx = mux + 3 * sx + 1
    bry = muy + 3 * sy + 1
    off = (ulx >= W) | (uly >= H) | (brx < 0) | (bry < 0)
    return tl.where(off, 0.0, 1.0)


@triton.jit
def _trunc(v):
    """Python int() / torch.trunc of a float, kept in float (no int32 overflow)."""
    return tl.where(v < 0, tl.ceil(v), tl.floor(v))


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even) for non-negative finite v."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


# ----------------------------------------------------------------------------- loss


@triton.jit
def _gauss_moments(
    base, mux, muy, inv_ax, inv_ay, scale, H, W,
    LOSS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Sweep one (H, W) map at ``base`` once, with g = scale * exp(-dx^2/2a_x) * exp(-dy^2/2a_y).

    LOSS: r = g - map (the teacher), returns sum r^2 and the moments of q = r * g;
    else: q = map * g (an upstream gradient). Moments: sum q dx, sum q dy, sum q dx^2, sum q dy^2.
    The Gaussian is separable, so exp runs once per row and column (not per pixel) and no
    per-pixel index division is needed; 2-D tiles [BLOCK_H, BLOCK_W] of contiguous rows.
    """
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    acc_s = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    acc_y1 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    acc_y2 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    acc_x1 = tl.zeros([BLOCK_W], dtype=tl.float32)
    acc_x2 = tl.zeros([BLOCK_W], dtype=tl.float32)
    for c0 in range(0, W, BLOCK_W):
        xi = c0 + cols
        mx = xi < W
        dx = xi.to(tl.float32) - mux
        gx = tl.exp(dx * dx * inv_ax * -0.5) * scale
        acc_q = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
        for r0 in range(0, H, BLOCK_H):
            yi = r0 + rows
            my = yi < H
            dy = yi.to(tl.float32) - muy
            gy = tl.exp(dy * dy * inv_ay * -0.5)
            m = my[:, None] & mx[None, :]
            v = tl.load(base + yi[:, None] * W + xi[None, :], mask=m, other=0.0).to(tl.float32)
            g = gy[:, None] * gx[None, :]
            if LOSS:
                r = tl.where(m, g - v, 0.0)
                acc_s += r * r
                q = r * g
            else:
                q = v * g
            acc_q += q
            acc_y1 += q * dy[:, None]
            acc_y2 += q * (dy * dy)[:, None]
        colsum = tl.sum(acc_q, axis=0)
        acc_x1 += colsum * dx
        acc_x2 += colsum * dx * dx
    s = tl.sum(tl.sum(acc_s, axis=1), axis=0)
    x1 = tl.sum(acc_x1, axis=0)
    x2 = tl.sum(acc_x2, axis=0)
    y1 = tl.sum(tl.sum(acc_y1, axis=1), axis=0)
    y2 = tl.sum(tl.sum(acc_y2, axis=1), axis=0)
    return s, x1, y1, x2, y2


@triton.jit
def _masked_load(ptr, ok, other, MASKED: tl.constexpr):
    if MASKED:
        v = tl.load(ptr, mask=ok, other=other)
    else:
        v = tl.load(ptr)
    return v.to(tl.float32)


@triton.jit
def _masked_store(ptr, v, ok, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, v, mask=ok)
    else:
        tl.store(ptr, v)


@triton.jit
def _map_params(coords_ptr, sigma_ptr, score_ptr, kw_ptr, pid, ok, Hf, Wf, MASKED: tl.constexpr):
    """Map ``pid``'s prediction (MASKED: read only where ``ok``): coordinates, sigmas, weight,
    score, the Gaussian's centre in pixels, its 3-sigma in-grid flag and 1 / (sigma^2 + 1e-9)."""
    cx = _masked_load(coords_ptr + 2 * pid, ok, 0.0, MASKED)
    cy = _masked_load(coords_ptr + 2 * pid + 1, ok, 0.0, MASKED)
    sx = _masked_load(sigma_ptr + 2 * pid, ok, 1.0, MASKED)
    sy = _masked_load(sigma_ptr + 2 * pid + 1, ok, 1.0, MASKED)
    kw = _masked_load(kw_ptr + pid, ok, 0.0, MASKED)
    sc = _masked_load(score_ptr + pid, ok, 0.0, MASKED)
    mux = cx * Wf
    muy = cy * Hf
    in_grid = _in_grid(mux, muy, sx, sy, Hf, Wf)
    inv_ax = 1.0 / (sx * sx + 1e-9)
    inv_ay = 1.0 / (sy * sy + 1e-9)
    return cx, cy, sx, sy, kw, sc, mux, muy, in_grid, inv_ax, inv_ay


@triton.jit
def _store_map_stats(
    stats_ptr, teacher_ptr, pid, ok, NK, W, HW, Hf, Wf,
    s, x1, y1, x2, y2, cx, cy, sx, sy, kw, sc, in_grid, inv_ax, inv_ay, MASKED: tl.constexpr,
):
    """From map ``pid``'s sums: the derivatives, the score target and the eight statistics
    (MASKED: stored only where ``ok``)."""
    # dS/dmu = 2/a sum (g-T) g dx; dS/dsigma = 2 sigma/a^2 sum (g-T) g dx^2; mu = c * W.
    dcx = 2.0 * x1 * inv_ax * Wf
    dcy = 2.0 * y1 * inv_ay * Hf
    dsx = 2.0 * (x2 * inv_ax) * (sx * inv_ax)
    dsy = 2.0 * (y2 * inv_ay) * (sy * inv_ay)

    # Score target: teacher value at the nearest pixel, 0 outside [0, 1] (NaN counts as outside).
    inside = (cx >= 0) & (cx <= 1) & (cy >= 0) & (cy <= 1)
    px = _round_half_even(tl.minimum(tl.maximum(cx, 0.0), 1.0) * (Wf - 1))
    py = _round_half_even(tl.minimum(tl.maximum(cy, 0.0), 1.0) * (Hf - 1))
    px = tl.where(inside, px, 0.0).to(tl.int32)
    py = tl.where(inside, py, 0.0).to(tl.int32)
    if MASKED:
        inside = inside & ok
    tv = tl.load(teacher_ptr + pid.to(tl.int64) * HW + py * W + px, mask=inside, other=0.0).to(tl.float32)
    err = sc * kw - tv * kw

    out = stats_ptr + pid  # rows ST_S .. ST_WSCORE
    _masked_store(out + 0 * NK, s, ok, MASKED)
    _masked_store(out + 1 * NK, dcx, ok, MASKED)
    _masked_store(out + 2 * NK, dcy, ok, MASKED)
    _masked_store(out + 3 * NK, dsx, ok, MASKED)
    _masked_store(out + 4 * NK, dsy, ok, MASKED)
    _masked_store(out + 5 * NK, kw * in_grid, ok, MASKED)
    _masked_store(out + 6 * NK, err, ok, MASKED)
    _masked_store(out + 7 * NK, kw, ok, MASKED)


@triton.jit
def _simhm_loss_fwd_kernel(
    coords_ptr, sigma_ptr, score_ptr, teacher_ptr, kw_ptr, stats_ptr,
    NK, H, W, HW,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)  # flat (n, k); the grid is exactly N*K programs: nothing to mask
    ok = pid < NK
    Wf = (W * 1.0)
    Hf = (H * 1.0)
    cx, cy, sx, sy, kw, sc, mux, muy, in_grid, inv_ax, inv_ay = _map_params(
        coords_ptr, sigma_ptr, score_ptr, kw_ptr, pid, ok, Hf, Wf, MASKED=False)
    s, x1, y1, x2, y2 = _gauss_moments(
        teacher_ptr + pid.to(tl.int64) * HW, mux, muy, inv_ax, inv_ay, in_grid, H, W,
        LOSS=True, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
    )
    _store_map_stats(stats_ptr, teacher_ptr, pid, ok, NK, W, HW, Hf, Wf,
                     s, x1, y1, x2, y2, cx, cy, sx, sy, kw, sc, in_grid, inv_ax, inv_ay, MASKED=False)


@triton.jit
def _whole_map_stats(
    v, pid, NK, coords_ptr, sigma_ptr, score_ptr, teacher_ptr, kw_ptr, stats_ptr, H, W, HW, pm, rows, cols,
):
    """The eight statistics of map ``pid`` from its whole (BLOCK_H, BLOCK_W) tile ``v`` (already
    loaded, zeros outside ``pm``); same math as _simhm_loss_fwd_kernel, no loop-carried state."""
    ok = pid < NK
    Wf = (W * 1.0)
    Hf = (H * 1.0)
    cx, cy, sx, sy, kw, sc, mux, muy, in_grid, inv_ax, inv_ay = _map_params(
        coords_ptr, sigma_ptr, score_ptr, kw_ptr, pid, ok, Hf, Wf, MASKED=True)
    dx = cols.to(tl.float32) - mux
    dy = rows.to(tl.float32) - muy
    gx = tl.exp(dx * dx * inv_ax * -0.5) * in_grid
    gy = tl.exp(dy * dy * inv_ay * -0.5)
    g = gy[:, None] * gx[None, :]
    r = tl.where(pm, g - v, 0.0)
    q = r * g
    s = tl.sum(tl.sum(r * r, axis=1), axis=0)
    qx = tl.sum(q, axis=0)  # column sums
    qy = tl.sum(q, axis=1)  # row sums
    x1 = tl.sum(qx * dx, axis=0)
    x2 = tl.sum(qx * dx * dx, axis=0)
    y1 = tl.sum(qy * dy, axis=0)
    y2 = tl.sum(qy * dy * dy, axis=0)
    _store_map_stats(stats_ptr, teacher_ptr, pid, ok, NK, W, HW, Hf, Wf,
                     s, x1, y1, x2, y2, cx, cy, sx, sy, kw, sc, in_grid, inv_ax, inv_ay, MASKED=True)


@triton.jit
def _simhm_loss_fwd_whole_kernel(
    coords_ptr, sigma_ptr, score_ptr, teacher_ptr, kw_ptr, stats_ptr,
    NK, H, W, HW,
    MAPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """_simhm_loss_fwd_kernel for maps that fit one tile (BLOCK_H >= H, BLOCK_W >= W), MAPS (1 or
    2) maps per program: the tile loads come before any arithmetic (ptxas may still issue them
    in groups) and no accumulator lives across iterations (fewer registers: more programs
    resident per SM, more bytes in flight; see tools/kernel_resources.py)."""
    tl.static_assert(MAPS == 1 or MAPS == 2, "MAPS: 1 or 2 maps per program")
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    pm = (rows < H)[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    pid0 = tl.program_id(0) * MAPS
    v0 = tl.load(teacher_ptr + pid0.to(tl.int64) * HW + offs, mask=pm, other=0.0).to(tl.float32)
    if MAPS == 2:
        pid1 = pid0 + 1
        # past the last map (odd N*K) read the last map again; its statistics are not stored
        src1 = tl.minimum(pid1, NK - 1).to(tl.int64) * HW
        v1 = tl.load(teacher_ptr + src1 + offs, mask=pm, other=0.0).to(tl.float32)
    _whole_map_stats(v0, pid0, NK, coords_ptr, sigma_ptr, score_ptr, teacher_ptr, kw_ptr, stats_ptr,
                     H, W, HW, pm, rows, cols)
    if MAPS == 2:
        _whole_map_stats(v1, pid1, NK, coords_ptr, sigma_ptr, score_ptr, teacher_ptr, kw_ptr, stats_ptr,
                         H, W, HW, pm, rows, cols)


@triton.jit
def _simhm_loss_finalize_kernel(
    stats_ptr, wk_ptr, reg_ptr, score_ptr,
    N, K, NK, HW,
    RELEASED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    Nf = (N * 1.0)
    Kf = (K * 1.0)
    HWf = (HW * 1.0)
    rows = tl.arange(0, BLOCK_N)[:, None]
    kk = tl.arange(0, BLOCK_K)
    reg = 0.0
    err = 0.0
    for k0 in range(0, K, BLOCK_K):  # joint blocks (BLOCK_K is capped: K may exceed it)
        cols = k0 + kk[None, :]
        acc_w2 = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum_i w_ik^2
        acc_s = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum_j S_jk
        acc_ws = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # w^2 S (per-sample form)
        acc_e = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # |score error|
        for n0 in range(0, N, BLOCK_N):
            r = n0 + rows
            m = (r < N) & (cols < K)
            idx = r * K + cols
            s = tl.load(stats_ptr + 0 * NK + idx, mask=m, other=0.0)
            w = tl.load(stats_ptr + 5 * NK + idx, mask=m, other=0.0)
            e = tl.load(stats_ptr + 6 * NK + idx, mask=m, other=0.0)
            acc_e += tl.abs(e)
            acc_w2 += tl.sum(w * w, axis=0)
            if RELEASED:
                acc_s += tl.sum(s, axis=0)
            else:
                acc_ws += w * w * s
        if RELEASED:
            # (1/K) sum_k [ (1/N) sum_i w_ik^2 ] [ (1/(N HW)) sum_j S_jk ]
            reg += tl.sum((acc_w2 / Nf) * (acc_s / (Nf * HWf)), axis=0)
        else:
            reg += tl.sum(tl.sum(acc_ws, axis=1), axis=0)
        err += tl.sum(tl.sum(acc_e, axis=1), axis=0)
        tl.store(wk_ptr + k0 + kk, acc_w2, mask=k0 + kk < K)
    if RELEASED:
        reg = reg / Kf
    else:
        reg = reg / (Nf * Kf * HWf)
    sl = err / (Nf * Kf)
    tl.store(reg_ptr, reg.to(reg_ptr.dtype.element_ty))
    tl.store(score_ptr, sl.to(score_ptr.dtype.element_ty))


@triton.jit
def _simhm_loss_bwd_kernel(
    stats_ptr, wk_ptr, greg_ptr, gscore_ptr,
    gcoords_ptr, gsigma_ptr, gsc_ptr,
    N, K, NK, HW,
    RELEASED: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NK
    gr = tl.load(greg_ptr).to(tl.float32)
    gs = tl.load(gscore_ptr).to(tl.float32)
    Nf = (N * 1.0)
    Kf = (K * 1.0)
    HWf = (HW * 1.0)
    if RELEASED:
        wk = tl.load(wk_ptr + offs % K, mask=m, other=0.0)
        c = wk / (Kf * Nf * Nf * HWf)
    else:
        w = tl.load(stats_ptr + 5 * NK + offs, mask=m, other=0.0)
        c = w * w / (Nf * Kf * HWf)
    c = c * gr
    dcx = tl.load(stats_ptr + 1 * NK + offs, mask=m, other=0.0)
    dcy = tl.load(stats_ptr + 2 * NK + offs, mask=m, other=0.0)
    dsx = tl.load(stats_ptr + 3 * NK + offs, mask=m, other=0.0)
    dsy = tl.load(stats_ptr + 4 * NK + offs, mask=m, other=0.0)
    e = tl.load(stats_ptr + 6 * NK + offs, mask=m, other=0.0)
    kw = tl.load(stats_ptr + 7 * NK + offs, mask=m, other=0.0)
    sgn = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))
    gsc = gs * sgn * kw / (Nf * Kf)
    ty = gcoords_ptr.dtype.element_ty
    tl.store(gcoords_ptr + 2 * offs, (c * dcx).to(ty), mask=m)
    tl.store(gcoords_ptr + 2 * offs + 1, (c * dcy).to(ty), mask=m)
    ty = gsigma_ptr.dtype.element_ty
    tl.store(gsigma_ptr + 2 * offs, (c * dsx).to(ty), mask=m)
    tl.store(gsigma_ptr + 2 * offs + 1, (c * dsy).to(ty), mask=m)
    tl.store(gsc_ptr + offs, gsc.to(gsc_ptr.dtype.element_ty), mask=m)


def simhm_loss_fwd(coords, sigma, score, teacher, keypoint_weight, released: bool):
    """-> (reg2hm (), score_loss (), stats (8, N, K) fp32, wk (K,) fp32). Inputs contiguous."""
    n, k, h, w = teacher.shape
    nk, hw = n * k, h * w
    dev = teacher.device
    stats = _alloc((NUM_STATS, n, k), device=dev, dtype=torch.float32)
    wk = _alloc((k,), device=dev, dtype=torch.float32)
    reg = _alloc((), device=dev, dtype=coords.dtype)
    sl = _alloc((), device=dev, dtype=score.dtype)
    if nk == 0:
        raise ValueError("simulated_heatmap_loss: empty batch (N*K == 0)")

    def run(tile: LossTile) -> None:
        if tile.maps == 0:
            _simhm_loss_fwd_kernel[(nk,)](
                coords, sigma, score, teacher, keypoint_weight, stats, nk, h, w, hw,
                BLOCK_H=tile.block_h, BLOCK_W=tile.block_w, num_warps=tile.num_warps,
            )
        else:
            _simhm_loss_fwd_whole_kernel[(cdiv(nk, tile.maps),)](
                coords, sigma, score, teacher, keypoint_weight, stats, nk, h, w, hw,
                MAPS=tile.maps, BLOCK_H=tile.block_h, BLOCK_W=tile.block_w, num_warps=tile.num_warps,
            )

    run(_tuned_tile(h, w, nk, teacher.dtype, dev, run, stats.clone))  # the output: the chosen tile's
    block_n, block_k, _, _ = _loss_plan(n, k)
    _simhm_loss_finalize_kernel[(1,)](
        stats, wk, reg, sl, n, k, nk, hw,
        RELEASED=bool(released), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return reg, sl, stats, wk


def simhm_loss_bwd(grad_reg, grad_score, stats, wk, coords_dtype, sigma_dtype, score_dtype, hw: int, released: bool):
    _, n, k = stats.shape
    nk = n * k
    dev = stats.device
    g_coords = _alloc((n, k, 2), device=dev, dtype=coords_dtype)
    g_sigma = _alloc((n, k, 2), device=dev, dtype=sigma_dtype)
    g_score = _alloc((n, k, 1), device=dev, dtype=score_dtype)
    _, _, block, grid = _loss_plan(n, k)
    _simhm_loss_bwd_kernel[(grid,)](
        stats, wk, grad_reg, grad_score, g_coords, g_sigma, g_score, n, k, nk, hw,
        RELEASED=bool(released), BLOCK=block, num_warps=4,
    )
    return g_coords, g_sigma, g_score


# ----------------------------------------------------------------------------- render


@triton.jit
def _render_fwd_kernel(
    mu_ptr, sigma_ptr, out_ptr, H, W, HW,
    MASK_OFF_GRID: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)  # flat (n, k)
    r0 = tl.program_id(1) * BLOCK_H
    mux = tl.load(mu_ptr + 2 * pid).to(tl.float32)
    muy = tl.load(mu_ptr + 2 * pid + 1).to(tl.float32)
    sx = tl.load(sigma_ptr + 2 * pid).to(tl.float32)
    sy = tl.load(sigma_ptr + 2 * pid + 1).to(tl.float32)
    inv_ax = 1.0 / (sx * sx + 1e-9)
    inv_ay = 1.0 / (sy * sy + 1e-9)
    if MASK_OFF_GRID:
        keep = _in_grid(mux, muy, sx, sy, (H * 1.0), (W * 1.0))
    else:
        keep = 1.0
    yi = r0 + tl.arange(0, BLOCK_H)
    my = yi < H
    dy = yi.to(tl.float32) - muy
    gy = tl.exp(dy * dy * inv_ay * -0.5) * keep
    base = out_ptr + pid.to(tl.int64) * HW
    for c0 in range(0, W, BLOCK_W):
        xi = c0 + tl.arange(0, BLOCK_W)
        mx = xi < W
        dx = xi.to(tl.float32) - mux
        gx = tl.exp(dx * dx * inv_ax * -0.5)
        g = gy[:, None] * gx[None, :]
        tl.store(base + yi[:, None] * W + xi[None, :], g.to(out_ptr.dtype.element_ty), mask=my[:, None] & mx[None, :])


@triton.jit
def _render_bwd_kernel(
    grad_ptr, mu_ptr, sigma_ptr, gmu_ptr, gsigma_ptr, H, W, HW,
    MASK_OFF_GRID: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    mux = tl.load(mu_ptr + 2 * pid).to(tl.float32)
    muy = tl.load(mu_ptr + 2 * pid + 1).to(tl.float32)
    sx = tl.load(sigma_ptr + 2 * pid).to(tl.float32)
    sy = tl.load(sigma_ptr + 2 * pid + 1).to(tl.float32)
    inv_ax = 1.0 / (sx * sx + 1e-9)
    inv_ay = 1.0 / (sy * sy + 1e-9)
    if MASK_OFF_GRID:
        keep = _in_grid(mux, muy, sx, sy, (H * 1.0), (W * 1.0))
    else:
        keep = 1.0
    base = grad_ptr + pid.to(tl.int64) * HW
    _, x1, y1, x2, y2 = _gauss_moments(
        base, mux, muy, inv_ax, inv_ay, keep, H, W, LOSS=False, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W
    )
    gmx = x1 * inv_ax
    gmy = y1 * inv_ay
    gsx = (x2 * inv_ax) * (sx * inv_ax)
    gsy = (y2 * inv_ay) * (sy * inv_ay)
    ty = gmu_ptr.dtype.element_ty
    tl.store(gmu_ptr + 2 * pid, gmx.to(ty))
    tl.store(gmu_ptr + 2 * pid + 1, gmy.to(ty))
    ty = gsigma_ptr.dtype.element_ty
    tl.store(gsigma_ptr + 2 * pid, gsx.to(ty))
    tl.store(gsigma_ptr + 2 * pid + 1, gsy.to(ty))


def render_fwd(mu, sigma, height: int, width: int, mask_off_grid: bool):
    n, k, _ = mu.shape
    hw = height * width
    out = _alloc((n, k, height, width), device=mu.device, dtype=mu.dtype)
    if n * k == 0 or hw == 0:
        return out
    bh, bw, warps = _tile(height, width)
    _render_fwd_kernel[(n * k, cdiv(height, bh))](
        mu, sigma, out, height, width, hw, MASK_OFF_GRID=bool(mask_off_grid), BLOCK_H=bh, BLOCK_W=bw, num_warps=warps,
    )
    return out


def render_bwd(grad, mu, sigma, mask_off_grid: bool):
    n, k, h, w = grad.shape
    g_mu = _alloc((n, k, 2), device=mu.device, dtype=mu.dtype)
    g_sigma = _alloc((n, k, 2), device=sigma.device, dtype=sigma.dtype)
    if n * k == 0:
        return g_mu, g_sigma
    bh, bw, warps = _tile(h, w)
    _render_bwd_kernel[(n * k,)](
        grad, mu, sigma, g_mu, g_sigma, h, w, h * w,
        MASK_OFF_GRID=bool(mask_off_grid), BLOCK_H=bh, BLOCK_W=bw, num_warps=warps,
    )
    return g_mu, g_sigma


# ----------------------------------------------------------------------------- targets

ENC_MSRA, ENC_UNBIASED, ENC_UDP = 0, 1, 2
_FP32_MAX = float(torch.finfo(torch.float32).max)


@triton.jit
def _targets_kernel(
    kpt_ptr, vis_ptr, out_ptr, wout_ptr,
    H, W, HW, stride_x, stride_y, sigma, tmp_size, gsize, half, inv_two_s2,
    ENCODING: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (n, k); see targets.py for the encodings (mmpose conventions)."""
    pid = tl.program_id(0)
    x = tl.load(kpt_ptr + 2 * pid).to(tl.float32)
    y = tl.load(kpt_ptr + 2 * pid + 1).to(tl.float32)
    v = tl.load(vis_ptr + pid).to(tl.float32)
    Wf = (W * 1.0)
    Hf = (H * 1.0)
    finite = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
    # Clamp (the box test's answer is unchanged) so float -> int conversions stay defined.
    x = tl.minimum(tl.maximum(tl.where(finite, x, 0.0), -1e7), 1e7)
    y = tl.minimum(tl.maximum(tl.where(finite, y, 0.0), -1e7), 1e7)
    fx = x / stride_x
    fy = y / stride_y
    if ENCODING == 1:  # unbiased: sub-pixel centre, full grid
        cx = fx
        cy = fy
        off = (fx - tmp_size >= Wf) | (fy - tmp_size >= Hf) | (fx + tmp_size + 1 < 0) | (fy + tmp_size + 1 < 0)
        x0 = 0.0
        x1 = Wf
        y0 = 0.0
        y1 = Hf
    else:  # msra / udp: integer centre (Python int() truncation), window of the Gaussian patch
        # Truncation in float (the same value an int32 conversion gives where that fits): with a
        # huge sigma, mu -/+ 3 sigma overflows int32.
        mx = _trunc(fx + 0.5)
        my = _trunc(fy + 0.5)
        ulx = _trunc(mx - tmp_size)
        uly = _trunc(my - tmp_size)
        brx = _trunc(mx + tmp_size + 1)
        bry = _trunc(my + tmp_size + 1)
        off = (ulx >= Wf) | (uly >= Hf) | (brx < 0) | (bry < 0)
        # patch pixel i sits at ul + i, value exp(-(i - half)^2 / (2 s^2)), i < len(patch)
        cx = ulx + half
        cy = uly + half
        if ENCODING == 2:  # udp: sub-pixel offset inside the Gaussian
            cx += fx - mx
            cy += fy - my
        x0 = tl.maximum(ulx, 0.0)
        y0 = tl.maximum(uly, 0.0)
        x1 = tl.minimum(tl.minimum(brx, Wf), ulx + gsize)
        y1 = tl.minimum(tl.minimum(bry, Hf), uly + gsize)
    wgt = tl.where(off, 0.0, v)
    wgt = tl.where(finite, wgt, 0.0)
    drawf = tl.where(wgt > 0.5, 1.0, 0.0)
    tl.store(wout_ptr + pid, wgt)
    base = out_ptr + pid.to(tl.int64) * HW
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    # separable: exp(-(dx^2 + dy^2) c) = exp(-dx^2 c) exp(-dy^2 c); the window is a box
    for c0 in range(0, W, BLOCK_W):
        xi = c0 + cols
        xf = xi.to(tl.float32)
        dx = xf - cx
        gx = tl.where((xf >= x0) & (xf < x1), tl.exp(-(dx * dx) * inv_two_s2), 0.0) * drawf
        for r0 in range(0, H, BLOCK_H):
            yi = r0 + rows
            yf = yi.to(tl.float32)
            dy = yf - cy
            gy = tl.where((yf >= y0) & (yf < y1), tl.exp(-(dy * dy) * inv_two_s2), 0.0)
            g = gy[:, None] * gx[None, :]
            m = (yi < H)[:, None] & (xi < W)[None, :]
            tl.store(base + yi[:, None] * W + xi[None, :], g.to(out_ptr.dtype.element_ty), mask=m)


def targets(keypoints, visibility, input_size, heatmap_size, sigma: float, encoding: int, dtype):
    """keypoints (N, K, 2) and visibility (N, K) contiguous -> (heatmaps (N,K,H,W), weights (N,K,1))."""
    n, k, _ = keypoints.shape
    h, w = heatmap_size
    consts, bh, bw, warps = _targets_plan(tuple(input_size), (h, w), float(sigma), int(encoding))
    out = _alloc((n, k, h, w), device=keypoints.device, dtype=dtype)
    wout = _alloc((n, k, 1), device=keypoints.device, dtype=torch.float32)
    if n * k == 0:
        return out, wout
    _targets_kernel[(n * k,)](
        keypoints, visibility, out, wout, h, w, h * w, *consts,
        ENCODING=int(encoding), BLOCK_H=bh, BLOCK_W=bw, num_warps=warps,
    )
    return out, wout


@functools.lru_cache(maxsize=64)
def _targets_plan(input_size: tuple, heatmap_size: tuple, sigma: float, encoding: int) -> tuple:
    """-> (scalar kernel arguments after HW, BLOCK_H, BLOCK_W, num_warps)."""
    from .targets import encoding_constants

    stride_x, stride_y, tmp_size, gsize, half = encoding_constants(input_size, heatmap_size, sigma, encoding)
    consts = (
        float(stride_x), float(stride_y), float(sigma), float(tmp_size), int(gsize), float(half),
        # capped at the largest float32 (sigma < 4e-20 overflowed it to inf: 0 * inf = NaN at the centre)
        min(1.0 / (2.0 * sigma * sigma), _FP32_MAX),
    )
    return (consts, *_tile(*heatmap_size))
