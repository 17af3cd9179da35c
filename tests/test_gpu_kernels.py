"""The Triton kernels on a real CUDA device, at the model's shapes, vs float64 references.

CI (no GPU) runs the same kernels under the Triton interpreter at small shapes
(test_heatmap.py, test_targets.py, test_attention.py); these tests are what checks the compiled
code (real bf16 dots, real tile sizes, real launch grids). Every output buffer is poisoned with
NaN first, inputs are fresh random draws, never zeros.
"""
from __future__ import annotations

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap as hm

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton")


def _loss_inputs(n, k, h, w, seed, device="cuda", teacher_dtype=torch.float32):
    from test_heatmap import _loss_inputs as cpu_inputs  # the CPU suite's inputs: every mask exercised

    return tuple(t.to(device) for t in cpu_inputs(n, k, h, w, seed=seed, teacher_dtype=teacher_dtype))


def _run_loss(fn, inputs, mode, dtype=None, **kw):
    coords, sigma, score, teacher, weight = inputs
    if dtype is not None:
        coords, sigma, score, teacher, weight = (t.to(dtype) for t in inputs)
    c, s, sc = (t.detach().clone().requires_grad_() for t in (coords, sigma, score))
    reg, sl = fn(c, s, sc, teacher, weight, mode=mode, **kw)
    (reg * 1.3 + sl * 0.7).backward()
    return reg.detach(), sl.detach(), c.grad, s.grad, sc.grad


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the heatmap kernels allocate starts as NaN."""
    from distilpose_kernels import heatmap_triton as hmt

    monkeypatch.setattr(hmt, "_alloc", lambda *a, **k: torch.full(*a, float("nan"), **k))


@pytest.mark.parametrize("mode", ["released", "per_sample"])
@pytest.mark.parametrize("shape", [(256, 17, 64, 48), (1, 17, 64, 48), (3, 133, 37, 29), (5, 17, 96, 72)], ids=str)
def test_gpu_simulated_heatmap_loss_vs_float64(shape, mode, poison):
    inputs = _loss_inputs(*shape, seed=sum(shape))
    got = _run_loss(dk.simulated_heatmap_loss, inputs, mode, backend="triton")  # the extension: test_heatmap_ext.py
    ref = _run_loss(hm.simulated_heatmap_loss_reference, inputs, mode, dtype=torch.float64)
    for name, a, b in zip(("reg2hm", "score", "d_coords", "d_sigma", "d_score"), got, ref):
        assert a.is_cuda and torch.isfinite(a).all(), name
        assert _rel_err(a, b) < 1e-5, f"{name}: rel err {_rel_err(a, b):.3g}"
    assert (got[2][0, :2] == 0).all()  # wholly off-grid keypoints: no coordinate gradient


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_gpu_simulated_heatmap_loss_low_precision_teacher(teacher_dtype):
    inputs = _loss_inputs(64, 17, 64, 48, seed=3, teacher_dtype=teacher_dtype)
    got = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
    ref = _run_loss(hm.simulated_heatmap_loss_reference, inputs, "released", dtype=torch.float64)
    for a, b in zip(got, ref):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("shape", [(256, 17, 64, 48), (3, 133, 37, 29)], ids=str)
def test_gpu_simulated_heatmap_loss_every_tile_and_tuned(shape, poison, monkeypatch):
    """Every tile the tuner may pick is right on the device; the tuned path is too, and it tunes once."""
    from distilpose_kernels import heatmap_triton as hmt

    inputs = _loss_inputs(*shape, seed=sum(shape) + 1)
    ref = _run_loss(hm.simulated_heatmap_loss_reference, inputs, "released", dtype=torch.float64)
    for tile in hmt.tile_candidates(*shape[2:]):
        monkeypatch.setattr(hmt, "TILE_OVERRIDE", tile)
        got = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
        for a, b in zip(got, ref):
            assert _rel_err(a, b) < 1e-5, str(tile)
    monkeypatch.setattr(hmt, "TILE_OVERRIDE", None)
    monkeypatch.setattr(hmt, "AUTOTUNE", True)
    monkeypatch.setattr(hmt, "_TUNED_TILES", {})
    a = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
    assert len(hmt._TUNED_TILES) == 1 and next(iter(hmt._TUNED_TILES.values())) in hmt.tile_candidates(*shape[2:])
    b = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
    for x, y, r in zip(a, b, ref):
        assert torch.equal(x, y) and _rel_err(x, r) < 1e-5  # the tuning call's result is the tuned tile's


def test_gpu_simulated_heatmap_loss_is_deterministic():
    inputs = _loss_inputs(256, 17, 64, 48, seed=11)
    a = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
    b = _run_loss(dk.simulated_heatmap_loss, inputs, "released", backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mask_off_grid", [False, True])
@pytest.mark.parametrize("shape", [(64, 17, 64, 48), (1, 133, 37, 29)], ids=str)
def test_gpu_render_vs_float64(shape, mask_off_grid, poison):
    n, k, h, w = shape
    coords, sigma, *_ = _loss_inputs(n, k, h, w, seed=k)
    mu = coords * torch.tensor([w, h], device="cuda")
    mu_t, s_t = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    out = dk.render_gaussian_heatmaps(mu_t, s_t, h, w, mask_off_grid=mask_off_grid)
    gout = torch.randn(n, k, h, w, device="cuda")
    (out * gout).sum().backward()
    mu_r, s_r = mu.double().requires_grad_(), sigma.double().requires_grad_()
    ref = hm.render_gaussian_heatmaps_reference(mu_r, s_r, h, w, mask_off_grid)
    (ref * gout.double()).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(mu_t.grad).all() and torch.isfinite(s_t.grad).all()
    assert _rel_err(out, ref.detach()) < 1e-5
    assert _rel_err(mu_t.grad, mu_r.grad) < 1e-4
    assert _rel_err(s_t.grad, s_r.grad) < 1e-4


@pytest.mark.parametrize("encoding", ["msra", "unbiased", "udp"])
@pytest.mark.parametrize("case", [(64, 17, (256, 192), (64, 48), 2.0), (3, 133, (100, 75), (25, 19), 1.5)], ids=str)
def test_gpu_targets_vs_numpy_loop(encoding, case, poison):
    from test_targets import _keypoints, numpy_targets

    n, k, ins, hms, sigma = case
    kp, vis = _keypoints(n, k, ins, seed=n + k)
    ref_maps, ref_w = numpy_targets(kp, vis, ins, hms, sigma, encoding)
    maps, w = dk.gaussian_heatmap_targets(kp.cuda(), vis.cuda(), ins, hms, sigma, encoding)
    assert maps.is_cuda and torch.isfinite(maps).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w.cpu(), ref_w, rtol=0, atol=0)
    torch.testing.assert_close(maps.cpu(), ref_maps, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,L,c,n_pos", [(64, 273, 192, 256), (1, 273, 192, 256), (3, 50, 24, 33)])
def test_gpu_add_pos_layernorm_vs_float64(dtype, n, L, c, n_pos):
    x = (torch.randn(n, L, c, device="cuda") * 2 + 0.5).to(dtype).requires_grad_()
    pos = torch.randn(n_pos, c, device="cuda").to(dtype)
    weight = (torch.rand(c, device="cuda") + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(c, device="cuda").to(dtype).requires_grad_()
    outs = dk.add_pos_layernorm(x, pos, weight, bias)
    gouts = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, (x, weight, bias), gouts)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    refs = dk.add_pos_layernorm_reference(x64, pos.double(), w64, b64)
    grads_ref = torch.autograd.grad(refs, (x64, w64, b64), [g.double() for g in gouts])
    # the same-dtype eager reference's error sets the bar for low precision (bf16 sums lose ~1%)
    xe, we, be = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    eager = dk.add_pos_layernorm_reference(xe, pos, we, be)
    grads_eager = torch.autograd.grad(eager, (xe, we, be), gouts)
    base = 1e-5 if dtype == torch.float32 else 4e-3
    names = ("residual", "normed", "dx", "dweight", "dbias")
    for name, a, e, b in zip(names, (*outs, *grads), (*eager, *grads_eager), (*refs, *grads_ref)):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_eager = _rel_err(a, b), _rel_err(e, b)
        assert err <= max(base, 2 * err_eager), f"{name}: rel err {err:.3g} (eager {dtype}: {err_eager:.3g})"


@pytest.mark.parametrize("d", [16, 24, 32, 64, 128])
@pytest.mark.parametrize("L", [1, 17, 273, 1000])
def test_gpu_attention_head_dims_and_lengths_bf16(d, L):
    h = 4
    qkv = (torch.randn(2, L, 3 * h * d, device="cuda", dtype=torch.float64) * 1.5).to(torch.bfloat16).requires_grad_()
    dout = torch.randn(2, L, h * d, device="cuda").to(torch.bfloat16)
    out = dk.token_attention(qkv, h)
    (g,) = torch.autograd.grad(out, qkv, dout)
    q64 = qkv.detach().double().requires_grad_()
    ref = dk.token_attention_reference(q64, h)
    (g_ref,) = torch.autograd.grad(ref, q64, dout.double())
    xe = qkv.detach().clone().requires_grad_()
    eager = dk.token_attention_reference(xe, h)  # bf16 eager: the bar for bf16 rounding
    (g_eager,) = torch.autograd.grad(eager, xe, dout)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(g).all()
    for name, a, e, b in (("out", out, eager, ref), ("dqkv", g, g_eager, g_ref)):
        err, err_eager = _rel_err(a, b), _rel_err(e, b)
        assert err <= max(1e-2, 2 * err_eager), f"{name}: rel err {err:.3g} (eager bf16: {err_eager:.3g})"


def test_gpu_attention_backward_is_deterministic():
    qkv = torch.randn(64, 273, 576, device="cuda").to(torch.bfloat16).requires_grad_()
    dout = torch.randn(64, 273, 192, device="cuda").to(torch.bfloat16)
    g1 = torch.autograd.grad(dk.token_attention(qkv, 8), qkv, dout)[0]
    g2 = torch.autograd.grad(dk.token_attention(qkv, 8), qkv, dout)[0]
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention_every_autotune_config(dtype, monkeypatch):
    """Each config the autotuner may pick gives the right answer at the TDE's shape (the
    split-key forward configs included: 3 x 8 heads x 273 tokens is a small launch)."""
    from distilpose_kernels import attention_triton as at

    qkv = (torch.randn(3, 273, 576, device="cuda", dtype=torch.float64) * 1.5).to(dtype)
    dout = torch.randn(3, 273, 192, device="cuda").to(dtype)
    q64 = qkv.double().requires_grad_()
    ref = dk.token_attention_reference(q64, 8)
    (g_ref,) = torch.autograd.grad(ref, q64, dout.double())
    xe = qkv.clone().requires_grad_()
    eager = dk.token_attention_reference(xe, 8)
    (g_eager,) = torch.autograd.grad(eager, xe, dout)
    # bf16: at most twice the bf16 eager path's error (or 1%); fp32: 1e-5
    tol_out = max(1e-2, 2 * _rel_err(eager, ref)) if dtype == torch.bfloat16 else 1e-5
    tol_g = max(1e-2, 2 * _rel_err(g_eager, g_ref)) if dtype == torch.bfloat16 else 1e-5
    monkeypatch.setattr(at, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype))
    assert 3 * 8 * 273 <= at.SPLIT_MAX_ROWS
    for cfg in at._configs(split=True):
        monkeypatch.setattr(at, "BLOCK_OVERRIDE", cfg)
        x = qkv.clone().requires_grad_()
        out = dk.token_attention(x, 8)
        (g,) = torch.autograd.grad(out, x, dout)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), str(cfg)
        assert _rel_err(out, ref) <= tol_out and _rel_err(g, g_ref) <= tol_g, f"{cfg}: {_rel_err(out, ref):.3g} {_rel_err(g, g_ref):.3g}"


def test_gpu_attention_autotuned_bucket_reuse(monkeypatch):
    """The autotuned path (one tuning per power-of-two bucket of L) gives the right answer."""
    from distilpose_kernels import attention_triton as at

    monkeypatch.setattr(at, "AUTOTUNE", True)
    monkeypatch.setattr(at, "_BUCKET_CONFIGS", {})
    for L in (273, 300, 511):  # one bucket: tuned once, then reused
        qkv = (torch.randn(2, L, 576, device="cuda") * 1.5).to(torch.bfloat16)
        out = dk.token_attention(qkv, 8)
        ref = dk.token_attention_reference(qkv.double(), 8)
        err_eager = _rel_err(dk.token_attention_reference(qkv, 8), ref)
        assert _rel_err(out, ref) <= max(1e-2, 2 * err_eager)
    assert {key[1] for key in at._BUCKET_CONFIGS} == {512}


def _capture(step):
    """Warm up ``step`` on a side stream, then capture it in a CUDA graph; returns the graph and
    the outputs of the captured call (static buffers the replays overwrite)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def test_gpu_attention_fwd_bwd_in_cuda_graph():
    qkv = torch.randn(8, 273, 576, device="cuda").to(torch.bfloat16).requires_grad_()
    dout = torch.randn(8, 273, 192, device="cuda").to(torch.bfloat16)

    def step():
        out = dk.token_attention(qkv, 8)
        return (out.detach(), *torch.autograd.grad(out, qkv, dout))

    graph, outs = _capture(step)
    with torch.no_grad():
        qkv.copy_(torch.randn_like(qkv))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, step()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
