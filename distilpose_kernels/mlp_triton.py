"""Triton kernels for ``linear_gelu``, ``linear`` and ``mlp`` (imported only when the Triton path runs).

y = gelu_erf(x @ w^T + b) (or without the GELU): a tiled GEMM (fp32 accumulation) whose
epilogue adds the bias and applies the exact (erf) GELU before the single store, so the
pre-activation never goes to memory. Grouped program order for L2 reuse of x tiles. float32
operands get fp32-accurate dots (``_utils.fp32_dot_precision``: 3xTF32 on sm_80+). On a GPU the
tile is autotuned per (M, N, K) among a few shapes: small-M GEMMs (batch 1) need narrow tiles
to occupy the SMs, large ones wide tiles.

``_mlp_kernel``: fc2(gelu(fc1(x))) for a block of rows per program. The hidden activation is
made and consumed chunk by chunk (BLOCK_H columns at a time) inside the program: it is never
written to memory, and the output row block stays in registers until its single store. The
output width must fit one tile (N <= 512).

Split tiles (small M, batch-1 latency): ``_linear_add_norm_kernel`` over (row block, column
tile, K slice) and ``_mlp_kernel`` over (row block, hidden slice) programs. Each stores an fp32
partial to a workspace and counts itself per row block; the last one sums the partials in a
fixed order and runs the epilogue, so the result does not depend on the arrival order.

``_linear_add_norm_kernel`` and ``_mlp_kernel`` with ADD_NORM: since a program holds whole
output rows, it can finish the pre-norm transformer step itself: add the residual stream (and
the position table on the visual tokens), store that, and store its LayerNorm
(``_add_norm_store``); the GEMM's output never goes to memory on its own.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from ._triton_helpers import dot as _dot
from ._triton_helpers import last_to_arrive, layernorm_rows, pdl_enter, split_bounds
from ._utils import cdiv, contiguous_vectors, fp32_dot_precision, pdl_launch, triton_interpret, zeroed_counts

_INTERPRET = triton_interpret()


class GemmTile(NamedTuple):
    """Launch shape of ``_linear_gelu_kernel``; ``split_k`` > 1: K slices per output tile
    (their partials summed by the tile's last program)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


DEFAULT_TILE = GemmTile(128, 64, 64, 4, 3)
#: tests pin a small tile (the interpreter is slow)
TILE_OVERRIDE: Optional[GemmTile] = None
#: output allocator (tests swap in a NaN-filled one)
_new_output = torch.empty
#: the GPU autotuners time the split tiles (below) up to this many rows: their workspace is
#: split x M x N fp32, and only small M (batch-1 latency) leaves SMs idle
SPLIT_MAX_ROWS = 4096


def _new_counts(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters of the split tiles, one per row block or output tile
    (``_utils.zeroed_counts``: the ``split_counters`` buffer, or a new one). Every split kernel
    leaves them at zero; tests swap in a shared buffer to check that."""
    return zeroed_counts(n, device)


@triton.jit
def _gemm_tile(X, Wt, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of X @ Wt^T for rows ``rm`` and output columns ``rn``
    (X (M, K), Wt (N, K) through their strides; masked rows / columns give zeros)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = X + rm.to(tl.int64)[:, None] * sxm
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(x_rows + (k0 + rk)[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(Wt + (k0 + rk)[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PRECISION, UPCAST)
    return acc


@triton.jit
def _linear_finish(acc, rm, rn, m_ok, n_ok, B, Y, sym, syn, HAS_B: tl.constexpr, GELU: tl.constexpr):
    if HAS_B:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    tl.store(Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear_gelu_kernel(
    X, Wt, B, Y, WS, CNT,
    M, N, K,
    sxm, sxk, swn, swk, sym, syn,
    HAS_B: tl.constexpr, GELU: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile per program_id(0) (grouped order). SPLIT_K > 1: the
    tile's K is cut in SPLIT_K slices (program_id(1)); each stores its fp32 partial to WS
    (SPLIT_K, M, N) and counts itself in CNT[tile] (zero before the launch); the tile's last
    program sums the partials in slice order, applies the bias and GELU, stores, and resets the
    count (as ``_linear_add_norm_kernel``)."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if SPLIT_K == 1:
        acc = _gemm_tile(X, Wt, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, PRECISION, UPCAST, BLOCK_M, BLOCK_N,
                         BLOCK_K)
        _linear_finish(acc, rm, rn, m_ok, n_ok, B, Y, sym, syn, HAS_B, GELU)
    else:
        pid_k = tl.program_id(1)
        k0, k1 = split_bounds(K, SPLIT_K, BLOCK_K, pid_k)  # a slice past K sums nothing: zeros
        part = _gemm_tile(X + k0 * sxk, Wt + k0 * swk, rm, rn, m_ok, n_ok, k1 - k0, sxm, sxk, swn, swk, PRECISION,
                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = m_ok[:, None] & n_ok[None, :]
        ws_rows = (pid_k * M + rm).to(tl.int64) * N  # small: split tiles run only up to SPLIT_MAX_ROWS rows
        tl.store(WS + ws_rows[:, None] + rn[None, :], part, mask=mask)
        if last_to_arrive(CNT + pid, SPLIT_K):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                rows = (s * M + rm).to(tl.int64) * N
                acc += tl.load(WS + rows[:, None] + rn[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            _linear_finish(acc, rm, rn, m_ok, n_ok, B, Y, sym, syn, HAS_B, GELU)
            tl.store(CNT + pid, 0)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    return fp32_dot_precision(device) if dtype == torch.float32 else "tf32"


#: autotuned tiles (GPU only): few, because each is compiled on first use of a shape
TUNE_TILES = (GemmTile(128, 64, 32, 4, 3), GemmTile(64, 64, 32, 4, 3), GemmTile(32, 64, 32, 4, 3))
#: timed too where M <= SPLIT_MAX_ROWS (batch 1: 546 rows, 162 tiles of 32 x 64 for N = 576): K
#: in 2 or 3 slices, a 2-3 step dot chain per program instead of 6 (K = 192) or 18 (K = 576);
#: 8 slices for long reductions (the TDE's patch embedding as a GEMM at batch 2: K = 3,072 over
#: only 48 output tiles: 384 programs of 12 steps instead of 96)
SPLIT_TILES = (GemmTile(32, 64, 32, 4, 3, 2), GemmTile(32, 64, 32, 4, 3, 3), GemmTile(32, 64, 32, 4, 3, 8))


#: a GEMM split tile of more than 3 slices is a candidate only when each slice keeps at least
#: this many of K (long reductions); the workspace of the others stays at 3 x M x N
LONG_SPLIT_MIN_K = 128


def _split_allowed(slices: int, k: int) -> bool:
    return slices <= 3 or k // slices >= LONG_SPLIT_MIN_K


def _prune_gemm_splits(configs, named_args, **kwargs):
    """The GEMM autotuner's early prune: the same rule as the workspace (``_candidates``), so it
    never launches a tile whose partials the workspace cannot hold."""
    k = named_args["K"]
    kept = [c for c in configs if _split_allowed(c.kwargs["SPLIT_K"], k)]
    return kept or configs[:1]


class _Family(NamedTuple):
    """One kernel's launch candidates: ``kernel()`` the kernel (looked up at launch: tests swap in
    a spy), ``config(tile)`` its constexprs, ``slices(tile)`` how many
    partials a split tile sums (1: not split), ``counts(tile, m, n)`` its counters; the GPU
    autotuners over ``tiles`` and, up to SPLIT_MAX_ROWS rows, over ``tiles + split_tiles``;
    ``default`` the tile used without autotuning."""

    kernel: Callable
    config: Callable
    slices: Callable
    counts: Callable
    tiles: tuple
    split_tiles: tuple
    default: object
    tuned: object
    tuned_small: object


def _family(kernel, config, slices, counts, tiles, split_tiles, key, default=None, prune=None) -> _Family:
    def tuner(ts):
        if _INTERPRET:
            return None
        extra = dict(prune_configs_by={"early_config_prune": prune}) if prune else {}
        return triton.autotune([triton.Config(config(t), num_warps=t.num_warps, num_stages=t.num_stages) for t in ts],
                               key=key, **extra)(kernel())

    return _Family(kernel, config, slices, counts, tiles, split_tiles, default or tiles[0], tuner(tiles),
                   tuner(tiles + split_tiles))


def _candidates(fam: _Family, override, m: int, on_gpu: bool, k: Optional[int] = None) -> tuple:
    """(autotuner or None, the tiles it may launch): on a GPU the autotuner (with the split tiles
    up to SPLIT_MAX_ROWS rows; given ``k``, the GEMM's long-split tiles only for long
    reductions, as its autotuner prunes them), else the override or the default tile."""
    small = m <= SPLIT_MAX_ROWS
    tuned = fam.tuned_small if small else fam.tuned
    if tuned is not None and override is None and on_gpu:
        splits = fam.split_tiles if small else ()
        if k is not None:
            splits = tuple(t for t in splits if _split_allowed(fam.slices(t), k))
        return tuned, fam.tiles + splits
    return None, (override or fam.default,)


def _split_workspace(fam: _Family, tiles: tuple, m: int, n: int, device, dummy: torch.Tensor) -> tuple:
    """(partials (slices, m, n) fp32, zeroed counters) for the split tiles among ``tiles``
    (``dummy`` twice when there are none)."""
    split = [t for t in tiles if fam.slices(t) > 1]
    if not split:
        return dummy, dummy
    ws = torch.empty((max(fam.slices(t) for t in split), m, n), device=device, dtype=torch.float32)
    return ws, _new_counts(max(fam.counts(t, m, n) for t in split), device)


def _launch_family(fam: _Family, tuned, tiles: tuple, grid: Callable[[dict], tuple], args: tuple, meta: dict) -> None:
    """Launch ``fam``'s kernel on ``args`` (its first argument the input, whose device decides
    programmatic dependent launch): through the autotuner, or with the one tile in ``tiles``."""
    pdl = pdl_launch(args[0].device)
    if tuned is not None:
        tuned[grid](*args, **meta, **pdl)
        return
    t = tiles[0]
    c = fam.config(t)
    fam.kernel()[grid(c)](*args, **meta, **c, **pdl, num_warps=t.num_warps, num_stages=t.num_stages)


def _gemm_config(t: GemmTile) -> dict:
    return dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT_K=t.split_k)


_GEMM = _family(lambda: _linear_gelu_kernel, _gemm_config, lambda t: t.split_k,
                lambda t, m, n: cdiv(m, t.block_m) * cdiv(n, t.block_n),  # one counter per output tile
                TUNE_TILES, SPLIT_TILES, ["M", "N", "K", "GELU", "PRECISION"], DEFAULT_TILE, prune=_prune_gemm_splits)
_TUNED, _TUNED_SMALL = _GEMM.tuned, _GEMM.tuned_small


def _gemm_grid(m: int, n: int, c: dict) -> tuple:
    return (cdiv(m, c["BLOCK_M"]) * cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])


def linear_gelu_forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        gelu: bool = True) -> torch.Tensor:
    """x2 (M, K) any strides, weight (N, K), bias (N,) or None -> (M, N) in x2's dtype."""
    m, k = x2.shape
    n = weight.shape[0]
    (bias,) = contiguous_vectors(bias)
    y = _new_output((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0:  # nothing to sum: gelu(bias)
        z = (bias.float() if bias is not None else torch.zeros(n, device=x2.device)).expand(m, n)
        y.copy_(torch.nn.functional.gelu(z) if gelu else z)
        return y
    tuned, tiles = _candidates(_GEMM, TILE_OVERRIDE, m, x2.is_cuda, k)
    ws, count = _split_workspace(_GEMM, tiles, m, n, x2.device, y)
    args = (x2, weight, bias if bias is not None else weight, y, ws, count, m, n, k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1))
    meta = dict(HAS_B=bias is not None, GELU=bool(gelu), PRECISION=_precision(x2.dtype, x2.device),
                UPCAST=_INTERPRET and x2.dtype == torch.bfloat16, GROUP_M=8)
    _launch_family(_GEMM, tuned, tiles, lambda c: _gemm_grid(m, n, c), args, meta)
    return y


# ----------------------------------------------------------------------------- add + LayerNorm epilogue


@triton.jit
def _add_norm_store(
    acc, rm, rn, m_ok, n_ok, N, L, P_START, eps,
    RES, srn, srl, src, POS, spp, spc, LNW, LNB, XO, Y,
    HAS_POS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """``acc``: (BLOCK_M rows, every one of the N columns) fp32, zero in padded columns. Stores
    x_out = acc + residual (+ pos on the rows whose token index l >= P_START) and
    y = LayerNorm(x_out) over the N columns, both (rows, N) contiguous; rows are (n, l) pairs
    of sequences of length L (the residual is read through its (n, l, c) strides)."""
    mask = m_ok[:, None] & n_ok[None, :]
    n = (rm // L).to(tl.int64)
    l = rm % L
    acc += tl.load(RES + n[:, None] * srn + l[:, None] * srl + rn[None, :] * src, mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        pi = l - P_START
        p_ok = m_ok & (pi >= 0)
        acc += tl.load(POS + pi[:, None] * spp + rn[None, :] * spc, mask=p_ok[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
    # round to the storage dtype first, so y is the LayerNorm of exactly the x_out returned
    xo = acc.to(XO.dtype.element_ty)
    off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(XO + off, xo, mask=mask)
    y, _, _ = layernorm_rows(tl.where(n_ok[None, :], xo.to(tl.float32), 0.0), rn, n_ok, N, eps, LNW, LNB, HAS_W, HAS_B)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_add_norm(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, B, RES, srn, srl, src, POS, spp, spc, LNW, LNB, XO, Y,
                   HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _add_norm_store(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, RES, srn, srl, src, POS, spp, spc, LNW, LNB, XO, Y,
                    HAS_POS, HAS_W, HAS_B)


@triton.jit
def _linear_add_norm_kernel(
    X, Wt, B, RES, POS, LNW, LNB, XO, Y, WS, CNT,
    M, N, K, L, P_START, eps,
    sxm, sxk, swn, swk, srn, srl, src, spp, spc,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
    SPLIT_K: tl.constexpr, EPI_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The GEMM, its bias, then the residual / position add and the LayerNorm of the result
    (``_add_norm_store``) for BLOCK_M rows and all N columns (N <= BLOCK_N).

    TILE_N == 0: one program per row block does all of it (grid (row blocks,)).
    TILE_N > 0 (split): programs (row block, TILE_N-column tile x K slice of SPLIT_K); each stores
    its fp32 partial tile to WS (SPLIT_K, M, N) and counts itself in CNT[row block] (zero before
    the launch); the last one of its row block sums the row block's partials in slice order (so
    the result does not depend on which program came last) and runs the epilogue. At a few
    hundred rows (batch-1 inference) whole-row programs fill few SMs; this spreads the GEMM over
    ~10x as many programs and still needs no second kernel for the LayerNorm.
    """
    pdl_enter(USE_PDL)
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if TILE_N == 0:
        acc = _gemm_tile(X, Wt, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, PRECISION, UPCAST, BLOCK_M, BLOCK_N,
                         BLOCK_K)
        _bias_add_norm(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, B, RES, srn, srl, src, POS, spp, spc, LNW, LNB,
                       XO, Y, HAS_BIAS, HAS_POS, HAS_W, HAS_B)
    else:
        n_tiles = tl.cdiv(N, TILE_N)
        pid_n = tl.program_id(1) % n_tiles
        pid_k = tl.program_id(1) // n_tiles
        k0, k1 = split_bounds(K, SPLIT_K, BLOCK_K, pid_k)  # a slice past K sums nothing: zeros
        rt = pid_n * TILE_N + tl.arange(0, TILE_N)
        t_ok = rt < N
        part = _gemm_tile(X + k0 * sxk, Wt + k0 * swk, rm, rt, m_ok, t_ok, k1 - k0, sxm, sxk, swn, swk, PRECISION,
                          UPCAST, BLOCK_M, TILE_N, BLOCK_K)
        ws_rows = (pid_k * M + rm).to(tl.int64) * N
        tl.store(WS + ws_rows[:, None] + rt[None, :], part, mask=m_ok[:, None] & t_ok[None, :])
        if last_to_arrive(CNT + pid_m, n_tiles * SPLIT_K):
            # EPI_M rows at a time: a whole (BLOCK_M, BLOCK_N) fp32 tile and its LayerNorm
            # temporaries would not fit in registers
            for e in tl.static_range(BLOCK_M // EPI_M):
                re = pid_m * BLOCK_M + e * EPI_M + tl.arange(0, EPI_M)
                e_ok = re < M
                acc = tl.zeros((EPI_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    rows = (s * M + re).to(tl.int64) * N
                    acc += tl.load(WS + rows[:, None] + rn[None, :], mask=e_ok[:, None] & n_ok[None, :], other=0.0,
                                   cache_modifier=".cg")
                _bias_add_norm(acc, re, rn, e_ok, n_ok, N, L, P_START, eps, B, RES, srn, srl, src, POS, spp, spc,
                               LNW, LNB, XO, Y, HAS_BIAS, HAS_POS, HAS_W, HAS_B)
            # every program of the row block has counted: back to zero, so a relaunch with the
            # same buffer (the autotuner's timing runs) finds it as the host made it
            tl.store(CNT + pid_m, 0)


class RowTile(NamedTuple):
    """Launch shape of a kernel that owns whole output rows: rows per program, the inner block
    (BLOCK_K of the GEMM + add + LayerNorm kernel, BLOCK_H of the whole-MLP kernel)."""

    block_m: int
    block_inner: int
    num_warps: int
    num_stages: int


class SplitTile(NamedTuple):
    """Launch shape of the split ``_linear_add_norm_kernel``: rows per program, the columns of a
    program's GEMM tile, BLOCK_K, and the number of K slices."""

    block_m: int
    tile_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


#: tests pin a small tile (the interpreter is slow): a RowTile (whole rows) or a SplitTile
ADD_NORM_TILE_OVERRIDE: Optional[Union[RowTile, SplitTile]] = None
ADD_NORM_TUNE_TILES = (RowTile(64, 32, 8, 3), RowTile(32, 32, 4, 3), RowTile(16, 64, 4, 3))
#: timed too where M <= SPLIT_MAX_ROWS. At the TDE's batch-1 shape (546 rows, N = 192, K = 192 or
#: 576) whole-row programs are 9 to 35; these launch 162 to 315. Few: each costs a compile on the
#: GPU's first call of a shape (the autotuner times them all).
ADD_NORM_SPLIT_TILES = (SplitTile(32, 64, 32, 3, 4, 3), SplitTile(16, 64, 32, 3, 4, 3), SplitTile(32, 32, 32, 2, 4, 3))


def _add_norm_config(t: Union[RowTile, SplitTile]) -> dict:
    """The constexprs of ``_linear_add_norm_kernel`` that a tile sets."""
    if isinstance(t, SplitTile):
        return dict(BLOCK_M=t.block_m, BLOCK_K=t.block_k, TILE_N=t.tile_n, SPLIT_K=t.split_k,
                    EPI_M=min(t.block_m, 16))
    return dict(BLOCK_M=t.block_m, BLOCK_K=t.block_inner, TILE_N=0, SPLIT_K=1, EPI_M=t.block_m)


_ADD_NORM = _family(lambda: _linear_add_norm_kernel, _add_norm_config,
                    lambda t: t.split_k if isinstance(t, SplitTile) else 1,
                    lambda t, m, n: cdiv(m, t.block_m),  # one counter per row block
                    ADD_NORM_TUNE_TILES, ADD_NORM_SPLIT_TILES, ["M", "N", "K", "PRECISION"])
_ADD_NORM_TUNED, _ADD_NORM_TUNED_SMALL = _ADD_NORM.tuned, _ADD_NORM.tuned_small


def _add_norm_grid(m: int, n: int, c: dict) -> tuple:
    return (cdiv(m, c["BLOCK_M"]), 1 if c["TILE_N"] == 0 else cdiv(n, c["TILE_N"]) * c["SPLIT_K"])


def _epilogue_args(residual: torch.Tensor, pos: Optional[torch.Tensor], norm_weight, norm_bias, eps: float):
    """(tensor args, scalar args, stride args, constexprs) of the add + LayerNorm epilogue.
    residual (N, L, C); pos (P, C) or None."""
    L = residual.shape[1]
    p = pos.shape[0] if pos is not None else 0
    norm_weight, norm_bias = contiguous_vectors(norm_weight, norm_bias)
    tensors = (residual, pos if pos is not None else residual,
               norm_weight if norm_weight is not None else residual, norm_bias if norm_bias is not None else residual)
    strides = (*residual.stride(), *(pos.stride() if pos is not None else (0, 0)))
    meta = dict(HAS_POS=pos is not None, HAS_W=norm_weight is not None, HAS_B=norm_bias is not None)
    return tensors, (L, L - p, float(eps)), strides, meta


def linear_add_norm_forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            residual: torch.Tensor, pos: Optional[torch.Tensor], norm_weight, norm_bias,
                            eps: float) -> tuple:
    """x2 (M, K) any strides, weight (N, K), residual (B, L, N) with B*L == M, pos (P, N) or None
    -> (x_out, y), each (M, N) in residual's dtype."""
    m, k = x2.shape
    n = weight.shape[0]
    (bias,) = contiguous_vectors(bias)
    x_out = _new_output((m, n), device=x2.device, dtype=residual.dtype)
    y = _new_output((m, n), device=x2.device, dtype=residual.dtype)
    if m == 0:
        return x_out, y
    (res, pos_t, lnw, lnb), scalars, strides, meta = _epilogue_args(residual, pos, norm_weight, norm_bias, eps)
    tuned, tiles = _candidates(_ADD_NORM, ADD_NORM_TILE_OVERRIDE, m, x2.is_cuda)
    ws, count = _split_workspace(_ADD_NORM, tiles, m, n, x2.device, y)
    args = (x2, weight, bias if bias is not None else weight, res, pos_t, lnw, lnb, x_out, y, ws, count, m, n, k,
            *scalars, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *strides)
    meta.update(HAS_BIAS=bias is not None, PRECISION=_precision(x2.dtype, x2.device),
                UPCAST=_INTERPRET and x2.dtype == torch.bfloat16, BLOCK_N=max(16, 1 << (n - 1).bit_length()))
    _launch_family(_ADD_NORM, tuned, tiles, lambda c: _add_norm_grid(m, n, c), args, meta)
    return x_out, y


# ----------------------------------------------------------------------------- whole MLP


class SplitMlpTile(NamedTuple):
    """Launch shape of the split ``_mlp_kernel``: rows per program, the hidden chunk of one
    step, the number of hidden slices (programs per row block)."""

    block_m: int
    block_h: int
    split_h: int
    num_warps: int
    num_stages: int


#: tests pin a small tile (the interpreter is slow): a RowTile (whole rows) or a SplitMlpTile
MLP_TILE_OVERRIDE: Optional[Union[RowTile, SplitMlpTile]] = None
MLP_TUNE_TILES = (RowTile(64, 64, 8, 2), RowTile(32, 64, 4, 2), RowTile(128, 32, 8, 2))
#: timed too where M <= SPLIT_MAX_ROWS: at the TDE's batch-1 shape (546 rows, 576 hidden) whole-row
#: programs are 5 to 18; these launch 315 or 630, one hidden slice of 64 or 32 columns each. 8 warps
#: and 16 rows: a (BLOCK_H x 256) fp32 slice of fc2's weight, split in two for 3xTF32, then fits
#: in registers (sm_90: no spills, ``tools/gemm_resources.py``)
MLP_SPLIT_TILES = (SplitMlpTile(16, 32, 9, 8, 2), SplitMlpTile(16, 32, 18, 8, 2))


@triton.jit
def _mlp_finish(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, B2, Y, sym, syn, RES, srn, srl, src, POS, spp, spc, LNW,
                LNB, XO, HAS_B2: tl.constexpr, ADD_NORM: tl.constexpr, HAS_POS: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr):
    """fc2's bias, then the store (ADD_NORM: the add + LayerNorm epilogue, Y its LayerNorm)."""
    if HAS_B2:
        acc += tl.load(B2 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ADD_NORM:
        _add_norm_store(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, RES, srn, srl, src, POS, spp, spc, LNW, LNB,
                        XO, Y, HAS_POS, HAS_W, HAS_B)
    else:
        tl.store(Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _mlp_kernel(
    X, W1, B1, W2, B2, Y, RES, POS, LNW, LNB, XO, WS, CNT,
    M, K, HID, N, L, P_START, eps,
    sxm, sxk, s1h, s1k, s2n, s2h, sym, syn, srn, srl, src, spp, spc,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ADD_NORM: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_H: tl.constexpr, EPI_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """fc2(gelu(fc1(x))) for BLOCK_M rows and all N outputs; the hidden activation made and
    consumed BLOCK_H columns at a time, never stored.

    SPLIT_H == 1: one program per row block (grid (row blocks,)) does all of it.
    SPLIT_H > 1: programs (row block, hidden slice); each sums its slice's share of fc2's output
    and stores it (fp32) to WS (SPLIT_H, M, N), then counts itself in CNT[row block] (zero
    before the launch); the row block's last program sums the shares in slice order (the same
    result whichever program came last), EPI_M rows at a time, runs the epilogue and resets the
    count. See ``_linear_add_norm_kernel``.
    """
    pdl_enter(USE_PDL)
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.arange(0, BLOCK_H)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    h_lo, h_hi = split_bounds(HID, SPLIT_H, BLOCK_H, tl.program_id(1))  # SPLIT_H == 1: all of it
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        h_ok = (h0 + rh) < h_hi
        u = _gemm_tile(X, W1 + h0 * s1h, rm, rh, m_ok, h_ok, K, sxm, sxk, s1h, s1k, PRECISION, UPCAST, BLOCK_M,
                       BLOCK_H, BLOCK_K)
        if HAS_B1:
            u += tl.load(B1 + h0 + rh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
        u = tl.where(h_ok[None, :], u, 0.0)  # padded columns: 0 (an inf in x made them NaN: inf * 0)
        w2 = tl.load(W2 + (h0 + rh)[:, None] * s2h + rn[None, :] * s2n, mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(u.to(W2.dtype.element_ty), w2, PRECISION, UPCAST)
    if SPLIT_H == 1:
        _mlp_finish(acc, rm, rn, m_ok, n_ok, N, L, P_START, eps, B2, Y, sym, syn, RES, srn, srl, src, POS, spp, spc,
                    LNW, LNB, XO, HAS_B2, ADD_NORM, HAS_POS, HAS_W, HAS_B)
    else:
        ws_rows = (tl.program_id(1) * M + rm).to(tl.int64) * N
        tl.store(WS + ws_rows[:, None] + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
        if last_to_arrive(CNT + pid_m, SPLIT_H):
            for e in tl.static_range(BLOCK_M // EPI_M):
                re = pid_m * BLOCK_M + e * EPI_M + tl.arange(0, EPI_M)
                e_ok = re < M
                part = tl.zeros((EPI_M, BLOCK_N), dtype=tl.float32)
                for sl in range(SPLIT_H):  # not unrolled: one share in registers at a time
                    rows = (sl * M + re).to(tl.int64) * N
                    part += tl.load(WS + rows[:, None] + rn[None, :], mask=e_ok[:, None] & n_ok[None, :], other=0.0,
                                    cache_modifier=".cg")
                _mlp_finish(part, re, rn, e_ok, n_ok, N, L, P_START, eps, B2, Y, sym, syn, RES, srn, srl, src, POS,
                            spp, spc, LNW, LNB, XO, HAS_B2, ADD_NORM, HAS_POS, HAS_W, HAS_B)
            tl.store(CNT + pid_m, 0)


def _mlp_config(t: Union[RowTile, SplitMlpTile]) -> dict:
    """The constexprs of ``_mlp_kernel`` that a tile sets."""
    if isinstance(t, SplitMlpTile):
        return dict(BLOCK_M=t.block_m, BLOCK_H=t.block_h, SPLIT_H=t.split_h, EPI_M=min(t.block_m, 16))
    return dict(BLOCK_M=t.block_m, BLOCK_H=t.block_inner, SPLIT_H=1, EPI_M=t.block_m)


_MLP = _family(lambda: _mlp_kernel, _mlp_config, lambda t: t.split_h if isinstance(t, SplitMlpTile) else 1,
               lambda t, m, n: cdiv(m, t.block_m),  # one counter per row block
               MLP_TUNE_TILES, MLP_SPLIT_TILES, ["M", "K", "HID", "N", "ADD_NORM", "PRECISION"])
_MLP_TUNED, _MLP_TUNED_SMALL = _MLP.tuned, _MLP.tuned_small


def _split_grid(m: int, c: dict, split: str) -> tuple:
    return (cdiv(m, c["BLOCK_M"]), c[split])


def mlp_forward(x2: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                eps: float = 1e-5):
    """x2 (M, K) any strides, w1 (HID, K), w2 (N, HID) with N <= mlp.MLP_MAX_N -> (M, N) in x2's
    dtype; with ``residual`` (B, L, N), B*L == M: (x_out, y) of the add + LayerNorm epilogue."""
    m, k = x2.shape
    hid, n = w1.shape[0], w2.shape[0]
    b1, b2 = contiguous_vectors(b1, b2)
    add_norm = residual is not None
    y = _new_output((m, n), device=x2.device, dtype=residual.dtype if add_norm else x2.dtype)
    x_out = _new_output((m, n), device=x2.device, dtype=residual.dtype) if add_norm else y
    if m == 0 or n == 0:
        return (x_out, y) if add_norm else y
    if add_norm:
        (res, pos_t, lnw, lnb), scalars, strides, emeta = _epilogue_args(residual, pos, norm_weight, norm_bias, eps)
    else:
        res = pos_t = lnw = lnb = y
        scalars, strides, emeta = (1, 1, 0.0), (0, 0, 0, 0, 0), dict(HAS_POS=False, HAS_W=False, HAS_B=False)
    tuned, tiles = _candidates(_MLP, MLP_TILE_OVERRIDE, m, x2.is_cuda)
    ws, count = _split_workspace(_MLP, tiles, m, n, x2.device, y)  # fc2's partials per hidden slice
    block_n = max(16, 1 << (n - 1).bit_length())
    block_k = min(64, max(16, 1 << (k - 1).bit_length()))
    args = (x2, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, y, res, pos_t, lnw, lnb, x_out,
            ws, count, m, k, hid, n, *scalars,
            x2.stride(0), x2.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
            y.stride(0), y.stride(1), *strides)
    meta = dict(HAS_B1=b1 is not None, HAS_B2=b2 is not None, ADD_NORM=add_norm, **emeta,
                PRECISION=_precision(x2.dtype, x2.device), UPCAST=_INTERPRET and x2.dtype == torch.bfloat16,
                BLOCK_K=block_k, BLOCK_N=block_n)
    _launch_family(_MLP, tuned, tiles, lambda c: _split_grid(m, c, "SPLIT_H"), args, meta)
    return (x_out, y) if add_norm else y
