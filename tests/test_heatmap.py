"""Simulated heatmaps: fused Triton loss and rendering vs the float64 PyTorch references.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), reached with backend="triton".
"""
from __future__ import annotations

import math

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap as hm
from distilpose_kernels import heatmap_triton as hmt

pytestmark = pytest.mark.interpreter

MODES = ("released", "per_sample")


def _loss_inputs(n, k, h, w, seed=0, teacher_dtype=torch.float32):
    """Inputs that exercise every branch: off-grid and outside-[0, 1] predictions, zero weights,
    tiny, zero and huge sigmas, the edges of [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, k, 2, generator=g) * 1.4 - 0.2  # some outside [0, 1], in-grid box
    sigma = torch.rand(n, k, 2, generator=g) * 3.0 + 0.3
    score = torch.randn(n, k, 1, generator=g)
    teacher = torch.rand(n, k, h, w, generator=g).to(teacher_dtype)
    weight = (torch.rand(n, k, 1, generator=g) > 0.3).float()
    coords[0, 0] = torch.tensor([3.0, 0.5])  # wholly off the grid (right)
    coords[0, 1] = torch.tensor([0.5, -2.0])  # wholly off the grid (top)
    sigma[0, 2] = torch.tensor([1e-4, 2e-4])  # tiny
    sigma[0, 3] = torch.tensor([1e3, 5e2])  # huge: box covers everything
    coords[0, 4] = torch.tensor([-0.05, 0.5])  # outside [0, 1] but on the grid: score target 0
    coords[0, 5] = torch.tensor([0.0, 1.0])  # edges of [0, 1] (ties: test_score_gather_hand_computed)
    weight[0, 6] = 0.0
    weight[0, 7] = 1.0
    sigma[0, 8] = torch.tensor([0.0, 0.7])  # exactly zero sigma
    return coords, sigma, score, teacher, weight


def _run(fn, coords, sigma, score, teacher, weight, mode, dtype=None, **kw):
    if dtype is not None:
        coords, sigma, score, teacher, weight = (t.to(dtype) for t in (coords, sigma, score, teacher, weight))
    c, s, sc = (t.detach().clone().requires_grad_() for t in (coords, sigma, score))
    reg, sl = fn(c, s, sc, teacher, weight, mode=mode, **kw)
    (reg * 1.3 + sl * 0.7).backward()
    return reg.detach(), sl.detach(), c.grad, s.grad, sc.grad


def _close(actual, expected, rtol=1e-4, rel_atol=1e-5):
    expected = expected.double()
    atol = rel_atol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 17, 13, 11), (1, 133, 7, 9), (3, 17, 64, 48)], ids=str)
def test_loss_matches_float64_reference(shape, mode):
    inputs = _loss_inputs(*shape, seed=sum(shape))
    got = _run(dk.simulated_heatmap_loss, *inputs, mode, backend="triton")
    ref = _run(hm.simulated_heatmap_loss_reference, *inputs, mode, dtype=torch.float64)
    names = ("reg2hm", "score_loss", "grad_coords", "grad_sigma", "grad_score")
    for name, a, b in zip(names, got, ref):
        assert torch.isfinite(a).all(), name
        _close(a, b)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    # masks really were exercised: off-grid keypoints get no coordinate gradient
    assert (got[2][0, :2] == 0).all() and (got[3][0, :2] == 0).all()
    assert (got[2].abs() > 0).any()


@pytest.mark.parametrize("shape", [(1, 9, 64, 48), (1, 9, 37, 29), (1, 9, 5, 70)], ids=str)
def test_loss_every_tuning_tile(shape, monkeypatch):
    """Each tile the GPU autotuner may pick gives the reference's answer (odd sizes included),
    writing every statistic (buffers start as NaN)."""
    monkeypatch.setattr(hmt, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    inputs = _loss_inputs(*shape, seed=sum(shape))
    ref = _run(hm.simulated_heatmap_loss_reference, *inputs, "per_sample", dtype=torch.float64)
    cands = hmt.tile_candidates(*shape[2:])
    assert cands[0] == hmt.default_loss_tile(*shape[2:]) and len(set(cands)) == len(cands) >= 4
    assert any(c.maps == 0 for c in cands) and any(c.maps >= 2 for c in cands)  # both kernels
    for tile in cands:
        monkeypatch.setattr(hmt, "TILE_OVERRIDE", tile)
        got = _run(dk.simulated_heatmap_loss, *inputs, "per_sample", backend="triton")
        for a, b in zip(got, ref):
            _close(a, b)


def test_loss_tuner_times_candidates_once_per_key_and_falls_back(monkeypatch):
    """The tuner's host logic (the timing itself needs a GPU): fastest candidate whose result
    agrees with the default kernel's, cached per key; a failing timer or a CUDA-graph capture
    gives the default; a fast but wrong candidate is skipped with a warning."""
    import triton.testing

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(hmt, "AUTOTUNE", True)
    monkeypatch.setattr(hmt, "_TUNED_TILES", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cands = hmt.tile_candidates(64, 48)
    default, fastest, wrong = cands[0], cands[3], cands[5]
    stats = torch.rand(8, 40, generator=torch.Generator().manual_seed(0)) + 0.5
    stats[1, 3] = float("nan")  # NaN statistics must compare equal to themselves
    stats[2, 4] = float("inf")
    runs = []

    def result():  # what the last launched tile wrote: reordered-sum noise, or garbage when wrong
        if runs[-1] == wrong:
            return stats * 1.01
        return stats * (1 + 1e-7 * (len(runs) % 3))

    speed = {fastest: 1.0, wrong: 0.5}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), speed.get(runs[-1], 2.0))[1])
    with pytest.warns(UserWarning, match="disagrees with the default"):
        assert hmt._tuned_tile(64, 48, 4352, torch.float32, cuda, runs.append, result) == fastest
    assert runs[0] == default and set(runs) == set(cands)
    n = len(runs)
    assert hmt._tuned_tile(64, 48, 5000, torch.float32, cuda, runs.append, result) == fastest  # same pow2 bucket
    assert len(runs) == n  # cached: nothing timed again
    # another dtype is another key; a timer that fails gives the default tile with a warning
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 1 / 0)
    with pytest.warns(UserWarning, match="tuning failed"):
        assert hmt._tuned_tile(64, 48, 4352, torch.bfloat16, cuda, runs.append, result) == default
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert hmt._tuned_tile(32, 24, 64, torch.float32, cuda, runs.append, result) == hmt.default_loss_tile(32, 24)
    assert (32, 24, torch.float32, 64, 0) not in hmt._TUNED_TILES  # not cached from inside a capture
    monkeypatch.setattr(hmt, "AUTOTUNE", False)
    assert hmt._tuned_tile(64, 48, 64, torch.float16, cuda, runs.append, result) == default


def test_loss_tuner_agreement_check():
    ref = torch.rand(8, 50) + 0.1
    assert hmt._agrees(ref * (1 + 3e-6), ref)
    assert not hmt._agrees(ref * 1.001, ref)
    bad = ref.clone()
    bad[4, 7] += 0.5
    assert not hmt._agrees(bad, ref)
    special = ref.clone()
    special[0, 0], special[1, 1] = float("nan"), float("-inf")
    assert hmt._agrees(special.clone(), special)
    nan_only_in_got = ref.clone()
    nan_only_in_got[3, 3] = float("nan")
    assert not hmt._agrees(nan_only_in_got, ref)


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_loss_low_precision_teacher(teacher_dtype):
    inputs = _loss_inputs(1, 17, 9, 7, teacher_dtype=teacher_dtype)
    got = _run(dk.simulated_heatmap_loss, *inputs, "released", backend="triton")
    ref = _run(hm.simulated_heatmap_loss_reference, *inputs, "released", dtype=torch.float64)
    for a, b in zip(got, ref):
        _close(a, b)


def test_loss_hand_computed_released_vs_per_sample():
    # 2 samples, 1 joint, 1 x 2 grid, sigma huge -> g == 1 (to 1e-8) on the grid.
    coords = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    sigma = torch.full((2, 1, 2), 1e4)
    score = torch.zeros(2, 1, 1)
    teacher = torch.stack([torch.zeros(1, 1, 2), torch.ones(1, 1, 2)])  # (g-T)^2: 1 then 0
    weight = torch.tensor([[[1.0]], [[0.0]]])
    for backend in ("triton", "reference"):
        rel, _ = dk.simulated_heatmap_loss(coords, sigma, score, teacher, weight, "released", backend=backend)
        per, _ = dk.simulated_heatmap_loss(coords, sigma, score, teacher, weight, "per_sample", backend=backend)
        # released: mean_i w^2 = 1/2, mean_{j,p} (g-T)^2 = 2/4 -> 1/4 ; per-sample: (1+1+0+0)/4 = 1/2
        assert float(rel) == pytest.approx(0.25, abs=1e-6)
        assert float(per) == pytest.approx(0.5, abs=1e-6)


def test_loss_hand_computed_all_off_grid_and_score_outside():
    coords = torch.tensor([[[5.0, 0.5], [0.5, -3.0]]], requires_grad=True)  # both boxes wholly off grid
    sigma = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]], requires_grad=True)
    score = torch.tensor([[[0.5], [-2.0]]], requires_grad=True)
    teacher = torch.rand(1, 2, 6, 5) + 0.5
    weight = torch.ones(1, 2, 1)
    for mode in MODES:
        for t in (coords, sigma, score):
            t.grad = None
        reg, sl = dk.simulated_heatmap_loss(coords, sigma, score, teacher, weight, mode, backend="triton")
        (reg + sl).backward()
        assert float(reg.detach()) == 0.0  # w = visible * in_grid = 0 for every joint
        assert float(sl.detach()) == pytest.approx((0.5 + 2.0) / 2)  # targets are 0 outside [0, 1]
        assert (coords.grad == 0).all() and (sigma.grad == 0).all()
        torch.testing.assert_close(score.grad, torch.tensor([[[0.5], [-0.5]]]))  # sign * w / (N K)


@pytest.mark.parametrize("tile", [None, hmt.LossTile(1, 4, 16, 4), hmt.LossTile(2, 4, 16, 4)],
                         ids=["default", "whole-map", "2-maps"])
def test_score_gather_hand_computed(tile, monkeypatch):
    monkeypatch.setattr(hmt, "TILE_OVERRIDE", tile)
    h, w = 3, 5
    teacher = (10 * torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)).float().expand(1, 6, h, w).contiguous()
    # x*(w-1) = 2, 0.5 (tie -> 0), 1.5 (tie -> 2), 4 ; y*(h-1) = 1, 2, 0, 1; last two outside [0, 1]
    coords = torch.tensor([[[0.5, 0.5], [0.125, 1.0], [0.375, 0.0], [1.0, 0.5], [1.01, 0.5], [0.5, -0.01]]])
    expected = torch.tensor([12.0, 20.0, 2.0, 14.0, 0.0, 0.0])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0]).view(1, 6, 1)
    score = torch.zeros(1, 6, 1)
    sigma = torch.ones(1, 6, 2)
    want = float((expected * weight.view(-1)).abs().mean())
    for backend in ("triton", "reference"):
        _, sl = dk.simulated_heatmap_loss(coords, sigma, score, teacher, weight, backend=backend)
        assert float(sl) == pytest.approx(want)
    torch.testing.assert_close(hm.teacher_value_at_prediction(coords, teacher).view(-1), expected)


def test_loss_no_nan_for_zero_sigma():
    n, k, h, w = 1, 4, 7, 6
    coords = torch.tensor([[[2 / w, 3 / h], [2.3 / w, 3.0 / h], [0.5, 0.5], [0.1, 0.9]]], requires_grad=True)
    sigma = torch.tensor([[[0.0, 0.0], [1e-12, 1e-12], [1e-6, 0.0], [1e-30, 3.0]]], requires_grad=True)
    score = torch.rand(n, k, 1, requires_grad=True)
    teacher = torch.rand(n, k, h, w)
    for mode in MODES:
        reg, sl = dk.simulated_heatmap_loss(coords, sigma, score, teacher, torch.ones(n, k, 1), mode, backend="triton")
        (reg + sl).backward()
        for t in (reg, sl, coords.grad, sigma.grad, score.grad):
            assert torch.isfinite(t).all()
        ref = hm.reg2hm_loss_reference(coords.double(), sigma.double(), teacher.double(), torch.ones(n, k, 1), mode)
        assert float(reg) == pytest.approx(float(ref), rel=1e-5)


def test_loss_kernels_overwrite_poisoned_outputs(monkeypatch):
    def nan_alloc(*args, **kwargs):
        return torch.full(*args, float("nan"), **kwargs)

    inputs = _loss_inputs(1, 9, 5, 4)
    clean = [_run(dk.simulated_heatmap_loss, *inputs, m, backend="triton") for m in MODES]
    monkeypatch.setattr(hmt, "_alloc", nan_alloc)
    c, s, sc, t, w = inputs
    for released in (True, False):
        outs = hmt.simhm_loss_fwd(c, s, sc, t, w, released)
        assert all(torch.isfinite(o).all() for o in outs)
        grads = hmt.simhm_loss_bwd(torch.tensor(1.0), torch.tensor(1.0), outs[2], outs[3], *[torch.float32] * 3, 20, released)
        assert all(torch.isfinite(g).all() for g in grads)
    for m, ref in zip(MODES, clean):
        for a, b in zip(_run(dk.simulated_heatmap_loss, *inputs, m, backend="triton"), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_only_one_output_used_and_no_teacher_grad():
    coords, sigma, score, teacher, weight = _loss_inputs(1, 17, 9, 7)
    teacher.requires_grad_()
    c = coords.clone().requires_grad_()
    reg, _ = dk.simulated_heatmap_loss(c, sigma, score, teacher, weight, backend="triton")
    reg.backward()  # the score-loss output is unused: its gradient is zero
    c2 = coords.clone().requires_grad_()
    reg2, _ = hm.simulated_heatmap_loss_reference(c2, sigma, score, teacher, weight)
    reg2.backward()
    _close(c.grad, c2.grad)
    assert teacher.grad is None


def test_loss_module_and_torch_compile_fullgraph():
    inputs = _loss_inputs(1, 17, 9, 7)
    mod = dk.SimulatedHeatmapLoss(mode="per_sample", backend="triton")
    assert "per_sample" in repr(mod)
    eager = _run(lambda *a, mode: mod(*a), *inputs, "per_sample")
    ref = _run(dk.simulated_heatmap_loss, *inputs, "per_sample", backend="triton")
    for a, b in zip(eager, ref):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *a, mode: dk.simulated_heatmap_loss(*a, mode=mode, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    for a, b in zip(_run(compiled, *inputs, "per_sample"), ref):
        torch.testing.assert_close(a, b)


def test_loss_opcheck():
    c, s, sc, t, w = _loss_inputs(1, 9, 4, 3)
    c.requires_grad_()
    s.requires_grad_()
    sc.requires_grad_()
    for released in (True, False):
        torch.library.opcheck(hm._simhm_loss_fwd, (c, s, sc, t, w, released))
        torch.library.opcheck(
            hm._simhm_loss_bwd,
            (torch.tensor(1.5), torch.tensor(-0.5), torch.randn(8, 1, 9), torch.rand(9), torch.float32,
             torch.float32, torch.float32, 12, released),
        )


def spy_calls(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` (a no-argument loader) with one that records each call."""
    calls = []
    real = getattr(module, name)

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(module, name, spy)
    return calls


def test_dispatch(monkeypatch):
    inputs = _loss_inputs(1, 17, 5, 4)
    calls = spy_calls(monkeypatch, hm, "_kernels")
    dk.simulated_heatmap_loss(*inputs)  # CPU tensors, auto -> reference
    assert not calls
    dk.simulated_heatmap_loss(*inputs, backend="triton")
    assert calls
    calls.clear()
    monkeypatch.setenv("DISTILPOSE_FORCE_REFERENCE", "1")
    dk.simulated_heatmap_loss(*inputs, backend="reference")
    dk.render_gaussian_heatmaps(inputs[0] * 4, inputs[1], 5, 4)
    assert not calls


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(coords=torch.rand(2, 17, 3)), ValueError, "coords"),
        (dict(sigma=torch.rand(2, 16, 2)), ValueError, "sigma"),
        (dict(score=torch.rand(2, 17)), ValueError, "score"),
        (dict(keypoint_weight=torch.rand(2, 17, 2)), ValueError, "keypoint_weight"),
        (dict(teacher_heatmaps=torch.rand(2, 17, 9)), ValueError, "teacher_heatmaps"),
        (dict(teacher_heatmaps=torch.rand(0, 17, 9, 7)), ValueError, "coords|teacher_heatmaps"),
        (dict(coords=torch.randint(0, 2, (2, 17, 2))), TypeError, "coords"),
        (dict(score=torch.rand(2, 17, 1, device="meta")), ValueError, "score"),
        (dict(mode="broadcast"), ValueError, "mode"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_loss_bad_inputs(change, exc, match):
    c, s, sc, t, w = _loss_inputs(2, 17, 9, 7)
    args = dict(coords=c, sigma=s, score=sc, teacher_heatmaps=t, keypoint_weight=w, backend="triton")
    args.update(change)
    with pytest.raises(exc, match=match):
        dk.simulated_heatmap_loss(**args)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("mask_off_grid", [False, True])
@pytest.mark.parametrize("shape", [(1, 17, 13, 11), (1, 133, 5, 7)], ids=str)
def test_render_matches_float64_reference(shape, mask_off_grid):
    n, k, h, w = shape
    coords, sigma, *_ = _loss_inputs(n, k, h, w, seed=k)
    mu = coords * torch.tensor([w, h])
    mu_t, s_t = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    out = dk.render_gaussian_heatmaps(mu_t, s_t, h, w, mask_off_grid=mask_off_grid, backend="triton")
    gout = torch.randn(n, k, h, w, generator=torch.Generator().manual_seed(1))
    (out * gout).sum().backward()
    mu_r, s_r = mu.double().requires_grad_(), sigma.double().requires_grad_()
    ref = hm.render_gaussian_heatmaps_reference(mu_r, s_r, h, w, mask_off_grid)
    (ref * gout.double()).sum().backward()
    assert out.shape == (n, k, h, w) and out.dtype == torch.float32
    _close(out, ref.detach(), rel_atol=1e-6)
    _close(mu_t.grad, mu_r.grad)
    _close(s_t.grad, s_r.grad)
    if mask_off_grid:  # keypoints 0 and 1 are wholly off the grid
        assert (out[0, :2] == 0).all() and (mu_t.grad[0, :2] == 0).all()
    assert float(out[0, 3].min()) > 0.99  # huge sigma: flat map


def test_render_matches_spec_simulated_gaussians_and_hand_value():
    n, k, h, w = 1, 17, 9, 7
    coords, sigma, *_ = _loss_inputs(n, k, h, w)
    maps, _ = hm.simulated_gaussians_reference(coords.double(), sigma.double(), h, w)
    mu = coords * torch.tensor([w, h])
    out = dk.render_gaussian_heatmaps(mu, sigma, h, w, mask_off_grid=True, backend="triton")
    _close(out, maps, rel_atol=1e-6)
    one = dk.render_gaussian_heatmaps(torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[1.0, 2.0]]]), 4, 5, backend="triton")
    assert float(one[0, 0, 1, 2]) == 1.0
    assert float(one[0, 0, 1, 3]) == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert float(one[0, 0, 3, 2]) == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_render_module_opcheck_poison_and_errors(monkeypatch):
    mu = (torch.rand(2, 3, 2) * 6).requires_grad_()
    sigma = (torch.rand(2, 3, 2) + 0.5).requires_grad_()
    mod = dk.GaussianHeatmapRenderer(5, 6, backend="triton")
    torch.testing.assert_close(mod(mu, sigma), dk.render_gaussian_heatmaps(mu, sigma, 5, 6, backend="reference"))
    torch.library.opcheck(hm._simhm_render_fwd, (mu, sigma, 5, 6, False))
    torch.library.opcheck(hm._simhm_render_bwd, (torch.randn(2, 3, 5, 6), mu.detach(), sigma.detach(), True))
    monkeypatch.setattr(hmt, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    out = hmt.render_fwd(mu.detach(), sigma.detach(), 5, 6, False)
    gm, gs = hmt.render_bwd(torch.randn(2, 3, 5, 6), mu.detach(), sigma.detach(), False)
    assert torch.isfinite(out).all() and torch.isfinite(gm).all() and torch.isfinite(gs).all()
    with pytest.raises(ValueError, match="height"):
        dk.render_gaussian_heatmaps(mu, sigma, 0, 6)
    with pytest.raises(ValueError, match="mu"):
        dk.render_gaussian_heatmaps(mu[..., :1], sigma[..., :1], 5, 6)
    with pytest.raises(ValueError, match="sigma"):
        dk.render_gaussian_heatmaps(mu, sigma[:1], 5, 6)


# ----------------------------------------------------------------------------- GPU compilation (no GPU needed)

_COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import distilpose_kernels.heatmap_triton as k

P, I = "*fp32", "i32"
cases = [
    (k._simhm_loss_fwd_kernel, dict(coords_ptr=P, sigma_ptr=P, score_ptr=P, teacher_ptr="*bf16", kw_ptr=P,
     stats_ptr=P, NK=I, H=I, W=I, HW=I), dict(BLOCK_H=16, BLOCK_W=64), ["H", "W"]),
    (k._simhm_loss_fwd_kernel, dict(coords_ptr=P, sigma_ptr=P, score_ptr=P, teacher_ptr=P, kw_ptr=P,
     stats_ptr=P, NK=I, H=I, W=I, HW=I), dict(BLOCK_H=64, BLOCK_W=64), []),
    (k._simhm_loss_fwd_whole_kernel, dict(coords_ptr=P, sigma_ptr=P, score_ptr=P, teacher_ptr=P, kw_ptr=P,
     stats_ptr=P, NK=I, H=I, W=I, HW=I), dict(MAPS=2, BLOCK_H=64, BLOCK_W=64), ["NK"]),
    (k._simhm_loss_fwd_whole_kernel, dict(coords_ptr=P, sigma_ptr=P, score_ptr=P, teacher_ptr="*bf16", kw_ptr=P,
     stats_ptr=P, NK=I, H=I, W=I, HW=I), dict(MAPS=1, BLOCK_H=64, BLOCK_W=64), []),
    (k._simhm_loss_finalize_kernel, dict(stats_ptr=P, wk_ptr=P, reg_ptr=P, score_ptr="*bf16", N=I, K=I, NK=I,
     HW=I), dict(RELEASED=True, BLOCK_N=64, BLOCK_K=32), ["N", "K"]),
    (k._simhm_loss_finalize_kernel, dict(stats_ptr=P, wk_ptr=P, reg_ptr=P, score_ptr=P, N=I, K=I, NK=I, HW=I),
     dict(RELEASED=False, BLOCK_N=64, BLOCK_K=32), []),
    (k._simhm_loss_bwd_kernel, dict(stats_ptr=P, wk_ptr=P, greg_ptr=P, gscore_ptr="*fp16", gcoords_ptr=P,
     gsigma_ptr="*bf16", gsc_ptr=P, N=I, K=I, NK=I, HW=I), dict(RELEASED=True, BLOCK=1024), ["N", "K"]),
    (k._render_fwd_kernel, dict(mu_ptr=P, sigma_ptr=P, out_ptr="*bf16", H=I, W=I, HW=I),
     dict(MASK_OFF_GRID=True, BLOCK_H=16, BLOCK_W=64), ["H"]),
    (k._render_bwd_kernel, dict(grad_ptr=P, mu_ptr=P, sigma_ptr=P, gmu_ptr=P, gsigma_ptr=P, H=I, W=I, HW=I),
     dict(MASK_OFF_GRID=True, BLOCK_H=16, BLOCK_W=64), ["W"]),
]
tsig = dict(kpt_ptr=P, vis_ptr=P, out_ptr=P, wout_ptr=P, H=I, W=I, HW=I, stride_x="fp32", stride_y="fp32",
            sigma="fp32", tmp_size="fp32", gsize=I, half="fp32", inv_two_s2="fp32")
cases += [(k._targets_kernel, tsig, dict(ENCODING=e, BLOCK_H=16, BLOCK_W=64), []) for e in (0, 1, 2)]
for fn, sig, consts, ones in cases:
    for as_one in (False, True):  # as_one: older Triton specialises int args equal to 1 as constexpr
        s, c = dict(sig), dict(consts)
        if as_one:
            if not ones:
                continue
            c.update({a: 1 for a in ones})
        s.update({name: "constexpr" for name in c})
        src = ASTSource(fn=fn, signature=s, constexprs={(list(s).index(n),): v for n, v in c.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled", len(cases))
'''


def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter does not run Triton's code generator: compile every kernel to a cubin for sm_90."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the GPU tests exercise the compiler on a real device")
    try:
        from triton.backends import backends

        if "nvidia" not in backends:
            pytest.skip("Triton's NVIDIA backend is not installed")
    except ImportError:
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout


def test_render_and_targets_custom_op_path_under_compile():
    """torch.compile goes through the registered custom ops; results equal the eager fast path."""
    torch._dynamo.reset()
    mu = (torch.rand(1, 5, 2) * 6).requires_grad_()
    sigma = (torch.rand(1, 5, 2) + 0.5).requires_grad_()
    render = torch.compile(
        lambda m, s: dk.render_gaussian_heatmaps(m, s, 5, 6, True, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    out = render(mu, sigma)
    (out * out).sum().backward()
    g_mu, g_sigma = mu.grad.clone(), sigma.grad.clone()
    mu.grad = sigma.grad = None
    eager = dk.render_gaussian_heatmaps(mu, sigma, 5, 6, True, backend="triton")
    (eager * eager).sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_mu, mu.grad)
    torch.testing.assert_close(g_sigma, sigma.grad)
    kp, vis = torch.rand(2, 4, 2) * 30, torch.ones(2, 4)
    targets = torch.compile(
        lambda k, v: dk.gaussian_heatmap_targets(k, v, (32, 24), (8, 6), 1.0, "udp", backend="triton"),
        fullgraph=True, backend="aot_eager",
    )
    for a, b in zip(targets(kp, vis), dk.gaussian_heatmap_targets(kp, vis, (32, 24), (8, 6), 1.0, "udp", backend="triton")):
        torch.testing.assert_close(a, b)


def test_loss_half_precision_student_outputs():
    """Under autocast the head may emit bf16/fp16: the kernels compute in fp32, return input dtypes."""
    c, s, sc, t, w = _loss_inputs(1, 17, 9, 7)
    for dt in (torch.bfloat16, torch.float16):
        inputs = (c.to(dt), s.to(dt), sc.to(dt), t, w)
        got = _run(dk.simulated_heatmap_loss, *inputs, "released", backend="triton")
        assert got[0].dtype == dt and got[2].dtype == dt and got[3].dtype == dt and got[4].dtype == dt
        ref = _run(hm.simulated_heatmap_loss_reference, *inputs, "released", dtype=torch.float64)
        for a, b in zip(got, ref):
            _close(a, b, rtol=2e-2, rel_atol=1e-2)
