"""@triton.jit helpers shared by the Triton kernel modules (imported only with them: imports triton)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST: the Triton 3.9 CPU interpreter multiplies
    bfloat16 operands wrongly, so under TRITON_INTERPRET bf16 operands are widened first."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


@triton.jit
def layernorm_rows(xf, cols, c_ok, C, eps, W, B, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of each row of ``xf`` (fp32, zero in the padded columns) over its C columns:
    -> (y fp32, mean, rstd); W / B (C,) applied when HAS_W / HAS_B."""
    mean = tl.sum(xf, 1) / C
    xc = tl.where(c_ok[None, :], xf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return y, mean, rstd


@triton.jit
def split_bounds(total, SPLIT: tl.constexpr, STEP: tl.constexpr, idx):
    """[lo, hi) of slice ``idx`` when range(total) is cut in SPLIT slices of whole STEPs (a
    slice past the end is empty: hi <= lo). SPLIT == 1: [0, total)."""
    length = tl.cdiv(tl.cdiv(total, SPLIT), STEP) * STEP
    lo = idx * length
    return lo, tl.minimum(total, lo + length)


@triton.jit
def last_to_arrive(count_ptr, expected):
    """The split kernels' semaphore, called by every program of a group once its partial results
    are stored: counts the program at ``count_ptr`` and is true for the one that completes
    ``expected`` arrivals. Every thread's stores come before the one-thread release atomic
    (the barrier); its acquire orders the caller's later loads (which should read with
    cache_modifier=".cg", from L2) after every other program's stores. The caller resets the
    count to 0 when it has read them, so relaunches on the same buffer work."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == expected - 1


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """A PDL-capable kernel's first step (``_utils.pdl_launch``), before any load or store. With
    USE_PDL (launched with ``launch_pdl=True``): wait until the previous kernel in the stream has
    completed and its writes are visible, then let the next kernel launch (its programs wait the
    same way, so starting early only hides its launch). Without: nothing."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
