"""simulated_heatmap_loss on the compiled extension (distilpose::simhm_loss_ext): the CPU kernels
(which share their per-map math with the CUDA kernels, csrc/simhm_math.h) and the C++ autograd,
vs the float64 reference and vs the Triton kernels' statistics (same (8, N, K) layout).

The CUDA kernels themselves are checked on a GPU (tests/test_gpu_kernels.py, marked gpu)."""
from __future__ import annotations

import sys

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap as hm
from distilpose_kernels import heatmap_triton as hmt
from test_heatmap import _close, spy_calls

pytestmark = pytest.mark.skipif(not hm.extension_loss_available("cpu"),
                                reason="the compiled extension (with the loss ops) is not built")

MODES = ("released", "per_sample")


def _inputs(n, k, h, w, seed=0, teacher_dtype=torch.float32):
    from test_heatmap import _loss_inputs  # every mask exercised: off-grid, outside [0, 1], zero sigma...

    return _loss_inputs(n, k, h, w, seed=seed, teacher_dtype=teacher_dtype)


def _run(backend, inputs, mode, dtype=None):
    coords, sigma, score, teacher, weight = inputs
    if dtype is not None:
        coords, sigma, score, teacher, weight = (t.to(dtype) for t in inputs)
    c, s, sc = (t.detach().clone().requires_grad_() for t in (coords, sigma, score))
    if backend == "reference":
        reg, sl = hm.simulated_heatmap_loss_reference(c, s, sc, teacher, weight, mode)
    else:
        reg, sl = dk.simulated_heatmap_loss(c, s, sc, teacher, weight, mode=mode, backend=backend)
    (reg * 1.3 + sl * 0.7).backward()
    return reg.detach(), sl.detach(), c.grad, s.grad, sc.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 17, 64, 48), (3, 17, 13, 11), (1, 133, 7, 9), (2, 10, 1, 5), (1, 9, 3, 1)], ids=str)
def test_ext_loss_matches_float64_reference(shape, mode):
    inputs = _inputs(*shape, seed=sum(shape))
    got = _run("cpp", inputs, mode)
    want = _run("reference", inputs, mode, dtype=torch.float64)
    for name, a, b in zip(("reg2hm", "score", "d_coords", "d_sigma", "d_score"), got, want):
        assert torch.isfinite(a).all(), name
        _close(a, b)
    masked = want[2] == 0  # e.g. wholly off-grid keypoints: exactly no coordinate gradient
    assert (got[2][masked] == 0).all()
    if shape[2] > 3:
        assert masked[0, :2].all()  # the two off-grid keypoints of _inputs


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ext_loss_teacher_dtypes(teacher_dtype):
    inputs = _inputs(2, 17, 16, 12, seed=5, teacher_dtype=teacher_dtype)
    got = _run("cpp", inputs, "released")
    want = _run("reference", inputs, "released", dtype=torch.float64)
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("released", [True, False])
def test_ext_statistics_equal_the_triton_kernels(released):
    """Same (8, N, K) statistics and (K,) joint weights as the Triton forward (interpreter)."""
    c, s, sc, t, w = _inputs(2, 9, 11, 7, seed=3)
    ext = torch.ops.distilpose.simhm_loss_ext_fwd(c, s, sc, t, w, released)
    tri = hmt.simhm_loss_fwd(c, s, sc, t, w, released)
    for name, a, b in zip(("reg2hm", "score", "stats", "joint_w2"), ext, tri):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12, msg=name)


def test_ext_strided_and_mixed_dtype_inputs():
    c, s, sc, t, w = _inputs(3, 9, 9, 6, seed=8)
    # non-contiguous views of every input, bf16 coords, float64 sigma, int weights
    c2 = torch.cat([c, c], -1)[..., ::2].to(torch.bfloat16)
    s2 = s.double().transpose(0, 1).contiguous().transpose(0, 1)
    t2 = torch.cat([t, t], -1)[..., ::2]
    w2 = w.to(torch.int64)
    reg, sl = dk.simulated_heatmap_loss(c2, s2, sc, t2, w2, backend="cpp")
    assert (reg.dtype, sl.dtype) == (torch.bfloat16, torch.float32)
    rreg, rsl = hm.simulated_heatmap_loss_reference(c2.double(), s2, sc.double(), t2.double(), w2.double())
    _close(reg, rreg, rtol=2e-2, rel_atol=1e-2)
    _close(sl, rsl)


def test_ext_only_one_output_used_and_no_teacher_grad():
    c, s, sc, t, w = _inputs(2, 17, 8, 6, seed=1)
    c.requires_grad_()
    sc.requires_grad_()
    t.requires_grad_()
    reg, sl = dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
    (gc,) = torch.autograd.grad(reg, (c,))
    rc = c.detach().double().requires_grad_()
    rreg, _ = hm.simulated_heatmap_loss_reference(rc, s.double(), sc.double(), t.detach().double(), w.double())
    (want,) = torch.autograd.grad(rreg, (rc,))
    _close(gc, want)
    assert t.grad is None
    reg, sl = dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
    sl.backward()
    assert t.grad is None and c.grad is not None and (c.grad == 0).all()  # the score loss has no coord gradient


def test_ext_backward_runs_no_python():
    """The forward is one dispatcher call and the backward is C++: no Python function of the
    library runs during backward()."""
    c, s, sc, t, w = (x.clone() for x in _inputs(2, 17, 8, 6, seed=2))
    for x in (c, s, sc):
        x.requires_grad_()
    reg, sl = dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
    loss = reg + sl
    seen = []

    def prof(frame, event, arg):
        if event == "call":
            seen.append(frame.f_code.co_filename)

    sys.setprofile(prof)
    try:
        loss.backward()
    finally:
        sys.setprofile(None)
    assert c.grad is not None and s.grad is not None and sc.grad is not None
    assert not [f for f in seen if "distilpose" in f], seen


def test_ext_inference_mode_and_no_grad():
    c, s, sc, t, w = _inputs(2, 17, 8, 6, seed=4)
    want = hm.simulated_heatmap_loss_reference(c.double(), s.double(), sc.double(), t.double(), w.double())
    with torch.inference_mode():
        got = dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
    for a, b in zip(got, want):
        _close(a, b)
    with torch.no_grad():
        got = dk.simulated_heatmap_loss(c.requires_grad_(), s, sc, t, w, backend="cpp")
    assert not got[0].requires_grad
    for a, b in zip(got, want):
        _close(a, b)


def test_ext_opcheck_and_compile_fullgraph():
    c, s, sc, t, w = _inputs(2, 9, 6, 4, seed=6)
    leaves = [x.clone().requires_grad_() for x in (c, s, sc)]
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext.default, (*leaves, t, w, True))
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext_fwd.default, (c, s, sc, t, w, False))
    reg, sl, stats, wk = torch.ops.distilpose.simhm_loss_ext_fwd(c, s, sc, t, w, True)
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext_bwd.default,
                          (torch.tensor(1.3), torch.tensor(0.7), stats, wk, torch.float32, torch.float64,
                           torch.float16, 24, True))
    torch._dynamo.reset()
    f = torch.compile(lambda *a: dk.simulated_heatmap_loss(*a, backend="cpp"), fullgraph=True)
    got = f(*leaves, t, w)
    g = torch.autograd.grad(got[0] + got[1], leaves)
    want = _run("cpp", (c, s, sc, t, w), "released")
    leaves2 = [x.clone().requires_grad_() for x in (c, s, sc)]
    eager = dk.simulated_heatmap_loss(*leaves2, t, w, backend="cpp")
    g2 = torch.autograd.grad(eager[0] + eager[1], leaves2)
    for a, b in zip(tuple(got) + g, tuple(eager) + g2):
        torch.testing.assert_close(a, b)
    assert want[0].item() == pytest.approx(got[0].item(), rel=1e-6)


def test_ext_errors_name_the_argument():
    c, s, sc, t, w = _inputs(2, 17, 9, 7)
    with pytest.raises(ValueError, match="coords.*backend='cuda'.*cuda"):
        dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cxx")
    op = torch.ops.distilpose.simhm_loss_ext_fwd
    with pytest.raises(RuntimeError, match="sigma: expected shape \\(2, 17, 2\\)"):
        op(c, s[:, :3], sc, t, w, True)
    with pytest.raises(RuntimeError, match="teacher_heatmaps: expected a 4-D tensor"):
        op(c, s, sc, t[0], w, True)
    with pytest.raises(RuntimeError, match="keypoint_weight: expected a floating-point tensor"):
        op(c, s, sc, t, w.long(), True)
    with pytest.raises(RuntimeError, match="teacher_heatmaps: expected a non-empty"):
        op(c[:0], s[:0], sc[:0], t[:0], w[:0], True)
    reg, sl, stats, wk = op(c, s, sc, t, w, True)
    with pytest.raises(RuntimeError, match="stats: expected a float32 \\(8, N, K\\)"):
        torch.ops.distilpose.simhm_loss_ext_bwd(reg, sl, stats[:7], wk, torch.float32, torch.float32,
                                                torch.float32, 63, True)
    for bad_hw in (0, 2**24):  # the forward's bound on H*W (pixel indices in float32)
        with pytest.raises(RuntimeError, match=f"hw: expected 0 < H\\*W < 2\\^24 \\(as the forward\\), got {bad_hw}"):
            torch.ops.distilpose.simhm_loss_ext_bwd(reg, sl, stats, wk, torch.float32, torch.float32,
                                                    torch.float32, bad_hw, True)
    # an empty backward (no maps) returns empty gradients
    g = torch.ops.distilpose.simhm_loss_ext_bwd(reg, sl, stats[:, :0], wk, torch.float32, torch.float32,
                                                torch.float32, 72, True)
    assert [tuple(x.shape) for x in g] == [(0, 17, 2), (0, 17, 2), (0, 17, 1)]


def test_ext_fwd_kernel_argument_is_checked_and_ignored_on_cpu():
    """fwd_kernel picks one of the CUDA forwards; the CPU kernels serve all three the same way,
    and an unknown index is an error naming the argument."""
    c, s, sc, t, w = _inputs(2, 17, 9, 8, seed=3)
    op = torch.ops.distilpose.simhm_loss_ext_fwd
    base = op(c, s, sc, t, w, True)  # the schema's default: 0 (blocks)
    for kernel in range(len(hm.SIMHM_FWD_KERNELS)):
        for a, b in zip(op(c, s, sc, t, w, True, kernel), base):
            assert torch.equal(a, b)
    for bad in (-1, len(hm.SIMHM_FWD_KERNELS)):
        with pytest.raises(RuntimeError, match=f"fwd_kernel: expected 0 \\(blocks\\), 1 \\(persistent\\) or "
                                               f"2 \\(pipelined\\), got {bad}"):
            op(c, s, sc, t, w, True, bad)
        with pytest.raises(RuntimeError, match="fwd_kernel: expected"):
            torch.ops.distilpose.simhm_loss_ext(c, s, sc, t, w, True, bad)


def test_fwd_kernel_switch(monkeypatch):
    """DISTILPOSE_SIMHM_FWD names a forward (case and spaces ignored); "auto" on CPU tensors is
    0 without timing anything; anything else is an error naming the variable."""
    inputs = _inputs(1, 17, 8, 8)
    c, s, sc, t, w = inputs
    monkeypatch.setattr(hm, "timed_choice", lambda *a, **k: pytest.fail("timed on the CPU"))
    for value, want in (("pipelined", 2), (" Persistent ", 1), ("blocks", 0), ("auto", 0), ("", 0)):
        monkeypatch.setenv("DISTILPOSE_SIMHM_FWD", value)
        assert hm._ext_fwd_kernel(c, s, sc, t, w, True) == want, value
    monkeypatch.setenv("DISTILPOSE_SIMHM_FWD", "fast")
    with pytest.raises(ValueError, match="DISTILPOSE_SIMHM_FWD: expected one of auto, blocks, persistent, "
                                         "pipelined, got 'fast'"):
        dk.simulated_heatmap_loss(*inputs, backend="cpp")


def test_fwd_kernel_tournament_keeps_the_fastest_agreeing_kernel(monkeypatch):
    """The "auto" forward choice, with the device timing faked (the extension's CPU op stands in
    for the CUDA one): persistent is timed against blocks, pipelined against the winner; a kernel
    is kept only if it is faster and its statistics agree; decisions are cached per shape and
    recorded; a kernel whose statistics disagree is refused with a warning."""
    from distilpose_kernels import _utils

    c, s, sc, t, w = _inputs(3, 17, 16, 12, seed=4)
    args = (c.detach(), s.detach(), sc.detach(), t, w, True)
    real = torch.ops.distilpose.simhm_loss_ext_fwd.default
    times = {}
    timed = []

    def fake_time(fn, *a, **k):
        kernel = fn.kernel
        timed.append(kernel)
        return times[kernel]

    def op(*a):
        out = real(*a)
        if a[-1] == 2 and times.get("broken"):
            return (out[0], out[1], out[2] * 1.01, out[3])  # pipelined "wrong" by 1%
        return out

    monkeypatch.setattr(_utils, "cuda_time_ms", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(hm, "_FWD_KERNEL_CHOICES", {})
    orig_timed_choice = hm.timed_choice

    def timed_choice(cache, key, fused, reference, agrees, what):  # tells fake_time which kernel runs
        fused.kernel, reference.kernel = key[-2], key[-1]
        return orig_timed_choice(cache, key, fused, reference, agrees, what)

    monkeypatch.setattr(hm, "timed_choice", timed_choice)
    n0 = len(dk.auto_choices())
    times.update({0: 1.0, 1: 1.5, 2: 0.5})  # persistent slower, pipelined fastest
    assert hm._timed_fwd_kernel(args, op) == 2
    assert timed == [1, 0, 2, 0]
    made = dk.auto_choices()[n0:]
    assert [(d["op"].split(": ")[1], d["use"], d["why"]) for d in made] == [
        ("the persistent CUDA forward (vs blocks)", "reference", "slower"),
        ("the pipelined CUDA forward (vs blocks)", "fused", "faster")]
    assert hm._timed_fwd_kernel(args, op) == 2 and len(timed) == 4  # cached: nothing timed again
    assert hm.chosen_fwd_kernel(t) == "pipelined" and hm.chosen_fwd_kernel(t[:1]) is None  # another shape
    monkeypatch.setenv("DISTILPOSE_SIMHM_FWD", "persistent")
    assert hm.chosen_fwd_kernel(t[:1]) == "persistent"
    monkeypatch.delenv("DISTILPOSE_SIMHM_FWD")

    monkeypatch.setattr(hm, "_FWD_KERNEL_CHOICES", {})
    timed.clear()
    times.update({0: 1.0, 1: 0.7, 2: 0.9})  # persistent wins, pipelined slower than it
    assert hm._timed_fwd_kernel(args, op) == 1 and timed == [1, 0, 2, 1]

    monkeypatch.setattr(hm, "_FWD_KERNEL_CHOICES", {})
    times.update({0: 1.0, 1: 2.0, 2: 0.1, "broken": True})  # the fastest disagrees: refused
    with pytest.warns(UserWarning, match="pipelined CUDA forward .*disagrees"):
        assert hm._timed_fwd_kernel(args, op) == 0


def test_ext_loss_compiles_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) traces the extension's op: the forward kernel choice neither
    times nor looks anything up while tracing (timed_choice's ContextVar read broke the graph).
    The CPU tensors stand in for CUDA ones in the choice."""
    from distilpose_kernels import _utils

    monkeypatch.setattr(hm, "_FWD_TIMED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(hm, "_FWD_KERNEL_CHOICES", {})
    monkeypatch.setattr(_utils, "cuda_time_ms", lambda *a, **k: 1.0)  # every kernel equally fast: blocks
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    inputs = _inputs(2, 17, 8, 6, seed=9)

    def f(c, s, sc, t, w):
        reg, sl = dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
        return reg + 0.01 * sl

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(*inputs)
    torch.testing.assert_close(got, f(*inputs))


def test_auto_uses_the_extension_only_on_cuda(monkeypatch):
    """"auto" on CPU tensors stays on the reference (the issue's dispatch: kernel on CUDA,
    reference elsewhere); the extension's CPU kernels are opt-in (``backend="cpp"``)."""
    inputs = _inputs(1, 17, 5, 4)
    calls = spy_calls(monkeypatch, hm, "_ext_loss")
    dk.simulated_heatmap_loss(*inputs)
    assert not calls
    dk.simulated_heatmap_loss(*inputs, backend="cpp")
    assert calls


# ----------------------------------------------------------------------------- CUDA (marked gpu)

_cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and hm.extension_loss_available("cuda")),
                               reason="needs a GPU and the extension built with CUDA")


def _cuda(inputs):
    return tuple(t.cuda() for t in inputs)


def _rel_err(a, ref):
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.gpu
@_cuda_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 17, 64, 48), (1, 17, 64, 48), (3, 133, 37, 29), (5, 17, 96, 72),
                                   (2, 9, 64, 50), (2, 1100, 4, 8)], ids=str)
def test_gpu_ext_loss_vs_float64(shape, teacher_dtype, mode):
    """Vector loads (W a multiple of 4 / 8 pixels) and scalar loads (W = 29, 50 for 16-bit), K
    beyond one finalize block (1100), batch 1; every mask of _inputs."""
    inputs = _cuda(_inputs(*shape, seed=sum(shape), teacher_dtype=teacher_dtype))
    got = _run("cuda", inputs, mode)
    want = _run("reference", inputs, mode, dtype=torch.float64)
    for name, a, b in zip(("reg2hm", "score", "d_coords", "d_sigma", "d_score"), got, want):
        assert a.is_cuda and torch.isfinite(a).all(), name
        assert _rel_err(a, b) < 1e-5, f"{name}: rel err {_rel_err(a, b):.3g}"
    assert (got[2][want[2] == 0] == 0).all()


@pytest.mark.gpu
@_cuda_ext
def test_gpu_ext_empty_backward_launches_nothing():
    """No maps: empty gradients (a launch of 0 blocks would be a CUDA configuration error)."""
    reg, sl, stats, wk = torch.ops.distilpose.simhm_loss_ext_fwd(*_cuda(_inputs(2, 17, 9, 8, seed=4)), True)
    g = torch.ops.distilpose.simhm_loss_ext_bwd(reg, sl, stats[:, :0], wk, torch.float32, torch.float32,
                                                torch.float32, 72, True)
    torch.cuda.synchronize()
    assert [tuple(x.shape) for x in g] == [(0, 17, 2), (0, 17, 2), (0, 17, 1)]
    assert all(x.is_cuda for x in g)


@pytest.mark.gpu
@_cuda_ext
def test_gpu_ext_misaligned_teacher_takes_the_scalar_loads():
    inputs = list(_cuda(_inputs(4, 17, 64, 48, seed=9)))
    flat = torch.empty(inputs[3].numel() + 1, device="cuda")
    shifted = flat[1:].view_as(inputs[3])  # contiguous, 4 bytes past a 16-byte boundary
    shifted.copy_(inputs[3])
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    inputs[3] = shifted
    got = _run("cuda", inputs, "released")
    want = _run("reference", inputs, "released", dtype=torch.float64)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.gpu
@_cuda_ext
@pytest.mark.parametrize("released", [True, False])
def test_gpu_ext_statistics_equal_the_triton_kernels(released):
    pytest.importorskip("triton")
    c, s, sc, t, w = _cuda(_inputs(64, 17, 64, 48, seed=12))
    ext = torch.ops.distilpose.simhm_loss_ext_fwd(c, s, sc, t, w, released)
    tri = hmt.simhm_loss_fwd(c, s, sc, t, w, released)
    for name, a, b in zip(("reg2hm", "score", "stats", "joint_w2"), ext, tri):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12, msg=name)


@pytest.mark.gpu
@_cuda_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 17, 64, 48), (3, 5, 64, 48), (1, 133, 37, 32), (4, 17, 128, 96),
                                   (2, 9, 64, 50), (2, 9, 64, 64), (2, 9, 64, 128)], ids=str)
@pytest.mark.parametrize("kernel", ["persistent", "pipelined"])
def test_gpu_ext_forward_kernels_match_and_repeat(shape, teacher_dtype, kernel, monkeypatch):
    """The persistent (blocks walk the maps, the next map's loads issued before this map's math)
    and pipelined (each block streams a range of maps through shared memory, cp.async) forwards:
    the same per-map arithmetic as the one-block-per-map kernel, so the statistics and losses
    equal its own (persistent: the same pixel split, 1e-6; pipelined: another split, fp32
    summation order, 1e-5) and repeat bit for bit. Maps wider than one pass (128 x 96 fp32: the
    persistent form falls back; the pipelined one needs 147 KB of shared memory, opted in; 64 x 64
    fp32 / 64 x 128 16-bit: exactly 48 KB of stages, over the limit without the opt-in once the
    reduction's static scratch is counted) and
    scalar-load widths (50: both fall back); fewer maps than blocks (15). The public op with
    DISTILPOSE_SIMHM_FWD set to the kernel agrees with float64."""
    c, s, sc, t, w = _cuda(_inputs(*shape, seed=sum(shape), teacher_dtype=teacher_dtype))
    op = torch.ops.distilpose.simhm_loss_ext_fwd
    index = hm.SIMHM_FWD_KERNELS.index(kernel)
    base = op(c, s, sc, t, w, True, 0)
    got = op(c, s, sc, t, w, True, index)
    again = op(c, s, sc, t, w, True, index)
    torch.cuda.synchronize()
    tol = 1e-6 if kernel == "persistent" else 1e-5
    for name, a, b, a2 in zip(("reg2hm", "score", "stats", "joint_w2"), got, base, again):
        assert torch.equal(a, a2), name  # deterministic
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()) + 1e-30, msg=name)
    monkeypatch.setenv("DISTILPOSE_SIMHM_FWD", kernel)
    want = _run("reference", (c, s, sc, t, w), "released", dtype=torch.float64)
    got = _run("cuda", (c, s, sc, t, w), "released")
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.gpu
@_cuda_ext
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_gpu_ext_pipelined_ring_wraps_racecheck(teacher_dtype):
    """The pipelined forward where every block streams more maps than its ring has stages (small
    maps, many of them: each block's stages are reused several times), against the one-block-per-map
    kernel. Small on purpose: gpu_check's sanitizer stage runs it under racecheck (the barrier
    that orders a stage's reads before the next copies into it)."""
    props = torch.cuda.get_device_properties(0)
    n = 8 * props.multi_processor_count  # 17 maps each: over 4 blocks per SM, several maps per block
    c, s, sc, t, w = _cuda(_inputs(n, 17, 16, 12, seed=31, teacher_dtype=teacher_dtype))
    op = torch.ops.distilpose.simhm_loss_ext_fwd
    base = op(c, s, sc, t, w, False, 0)
    got = op(c, s, sc, t, w, False, 2)
    for name, a, b in zip(("reg2hm", "score", "stats", "joint_w2"), got, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-30, msg=name)


@pytest.mark.gpu
@_cuda_ext
def test_gpu_ext_auto_forward_kernel_is_timed_once_and_recorded(monkeypatch):
    """DISTILPOSE_SIMHM_FWD=auto (the default): the first call of a shape times persistent
    against blocks and pipelined against the winner (two recorded decisions, both agreeing),
    later calls reuse the choice; results equal float64."""
    monkeypatch.delenv("DISTILPOSE_SIMHM_FWD", raising=False)
    monkeypatch.setattr(hm, "_FWD_KERNEL_CHOICES", {})
    inputs = _cuda(_inputs(64, 17, 64, 48, seed=21))
    n0 = len(dk.auto_choices())
    got = _run(None, inputs, "released")
    made = [d for d in dk.auto_choices()[n0:] if d["op"].startswith("simulated_heatmap_loss: the ")]
    assert len(made) == 2 and all(d["why"] in ("faster", "slower") for d in made), made
    assert len(hm._FWD_KERNEL_CHOICES) == 2
    again = _run(None, inputs, "released")
    assert len(hm._FWD_KERNEL_CHOICES) == 2  # no new decision
    want = _run("reference", inputs, "released", dtype=torch.float64)
    for a, a2, b in zip(got, again, want):
        assert torch.equal(a, a2) and _rel_err(a, b) < 1e-5


@pytest.mark.gpu
@_cuda_ext
def test_gpu_ext_is_the_default_on_cuda_and_deterministic(monkeypatch):
    inputs = _cuda(_inputs(256, 17, 64, 48, seed=11))
    monkeypatch.setattr(hm, "_kernels", lambda: pytest.fail("auto took the Triton path"))
    a = _run(None, inputs, "released")
    b = _run(None, inputs, "released")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ext_pdl_argument_follows_programmatic_launch_and_reaches_the_backward(monkeypatch):
    """The extension's ``pdl`` argument (programmatic dependent launch of its CUDA kernels) is
    what ``programmatic_launch`` / DISTILPOSE_PDL ask for, False while compiling; the C++
    autograd hands it to the backward op. The CPU kernels ignore it: the same losses and
    gradients either way."""
    from distilpose_kernels import _utils

    monkeypatch.setattr(_utils, "_PDL_DEFAULT", False)
    c, s, sc, t, w = _inputs(2, 9, 6, 4, seed=8)
    seen = []
    op = hm._ext_loss()
    monkeypatch.setattr(hm, "_ext_loss", lambda: lambda *a: seen.append(a[-1]) or op(*a))
    results = []
    for on in (False, True):
        leaves = [x.clone().requires_grad_() for x in (c, s, sc)]
        with _utils.programmatic_launch(on):
            reg, sl = dk.simulated_heatmap_loss(*leaves, t, w, backend="cpp")
            results.append((reg, sl, *torch.autograd.grad(reg + 0.3 * sl, leaves)))
    assert seen == [False, True]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    reg, sl, stats, wk = torch.ops.distilpose.simhm_loss_ext_fwd(c, s, sc, t, w, True, 0, True)
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext_fwd.default, (c, s, sc, t, w, True, 0, True))
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext_bwd.default,
                          (torch.tensor(1.3), torch.tensor(0.7), stats, wk, torch.float32, torch.float32,
                           torch.float32, 24, True, True))
    leaves = [x.clone().requires_grad_() for x in (c, s, sc)]
    torch.library.opcheck(torch.ops.distilpose.simhm_loss_ext.default, (*leaves, t, w, True, 0, True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_ext_loss_with_pdl_is_bit_identical_in_graphs():
    """The extension's kernels launched with programmatic dependent launch (the finalize and the
    backward scheduled early, waiting in griddepcontrol.wait), captured in a CUDA graph and
    replayed on new inputs: bit-identical to the graph without it, for every forward kernel."""
    if not hm.extension_loss_available("cuda"):
        pytest.skip("the extension is not built with CUDA")
    static = [t.clone() for t in _cuda(_inputs(64, 17, 64, 48, seed=5))]
    leaves = [t.requires_grad_() for t in static[:3]]
    for kernel in hm.SIMHM_FWD_KERNELS:
        graphs = {}
        for pdl in (False, True):
            def step(pdl=pdl):
                reg, sl, _, _ = torch.ops.distilpose.simhm_loss_ext_fwd(*[x.detach() for x in static], True,
                                                                        hm.SIMHM_FWD_KERNELS.index(kernel), pdl)
                reg2, sl2 = torch.ops.distilpose.simhm_loss_ext(*leaves, static[3], static[4], True,
                                                                hm.SIMHM_FWD_KERNELS.index(kernel), pdl)
                upstream = (torch.ones_like(reg2), 0.3 * torch.ones_like(sl2))
                return (reg, sl, *torch.autograd.grad((reg2, sl2), leaves, upstream))

            graphs[pdl] = dk.capture_cuda_graph(step, warmup=2)
        for seed in (6, 7, 8):
            fresh = _cuda(_inputs(64, 17, 64, 48, seed=seed))
            with torch.no_grad():
                for dst, src in zip(static, fresh):
                    dst.copy_(src)
            outs = []
            for pdl in (False, True):
                graphs[pdl][0].replay()
                outs.append([o.clone() for o in graphs[pdl][1]])
            torch.cuda.synchronize()
            for a, b in zip(*outs):
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{kernel}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_loss_fwd_bwd_in_cuda_graph(backend):
    """Forward + backward captured once, replayed on new inputs copied into the static buffers
    (the extension's and the Triton kernels)."""
    if backend == "cuda" and not hm.extension_loss_available("cuda"):
        pytest.skip("the extension is not built with CUDA")
    if backend == "triton":
        pytest.importorskip("triton")
    static = [t.clone() for t in _cuda(_inputs(32, 17, 64, 48, seed=5))]
    leaves = [t.requires_grad_() for t in static[:3]]

    def step():
        reg, sl = dk.simulated_heatmap_loss(*leaves, static[3], static[4], backend=backend)
        return (reg.detach(), sl.detach(), *torch.autograd.grad(reg + 0.5 * sl, leaves))

    graph, outs = dk.capture_cuda_graph(step, warmup=2)
    for seed in (6, 7):
        fresh = _cuda(_inputs(32, 17, 64, 48, seed=seed))
        with torch.no_grad():
            for dst, src in zip(static, fresh):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = step()
        for a, b in zip(outs, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@_cuda_ext
def test_gpu_ext_errors_name_the_argument():
    c, s, sc, t, w = _cuda(_inputs(2, 17, 9, 8))
    with pytest.raises(RuntimeError, match="sigma: expected a tensor on cuda"):
        torch.ops.distilpose.simhm_loss_ext_fwd(c, s.cpu(), sc, t, w, True)
    with pytest.raises(ValueError, match="coords: backend='cpp' needs a cpu tensor"):
        dk.simulated_heatmap_loss(c, s, sc, t, w, backend="cpp")
