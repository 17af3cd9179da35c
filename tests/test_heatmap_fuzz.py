"""Adversarial checks of simulated_heatmap_loss and render_gaussian_heatmaps: the spec's loss text
re-implemented here in float64 (loops over joints, Python rounding for the score gather),
independent of the module's reference; odd shapes, strided views of every input, mixed and
16-bit dtypes, the NaN policy, K beyond one finalize block, and bad arguments.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), reached with
backend="triton"."""
from __future__ import annotations

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap as hm
from distilpose_kernels import heatmap_triton as hmt

pytestmark = pytest.mark.interpreter

#: "cpp": the compiled extension's CPU kernels (the CUDA kernels' shared math and C++ autograd)
BACKENDS = ("triton", "reference") + (("cpp",) if hm.extension_loss_available("cpu") else ())
MODES = ("released", "per_sample")


def spec_losses(coords, sigma, score, teacher, kw, mode):
    """Spec, student losses 4 and 5, in float64, written from the text (not from hm.*)."""
    c, s, sc, t, kw = (x.double() for x in (coords, sigma, score, teacher, kw))
    n, k, h, w = t.shape
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    ys = torch.arange(h, dtype=torch.float64).view(h, 1)
    terms = []
    for j in range(k):
        mux, muy = c[:, j, 0] * w, c[:, j, 1] * h  # mu = pred * (W, H)
        sx, sy = s[:, j, 0], s[:, j, 1]
        g = torch.exp(-((xs - mux.view(n, 1, 1)) ** 2 / (sx.view(n, 1, 1) ** 2 + 1e-9)
                        + (ys - muy.view(n, 1, 1)) ** 2 / (sy.view(n, 1, 1) ** 2 + 1e-9)) / 2)
        with torch.no_grad():  # 3-sigma box [mu - 3 sigma, mu + 3 sigma + 1] wholly outside the grid
            off = (mux - 3 * sx >= w) | (muy - 3 * sy >= h) | (mux + 3 * sx + 1 < 0) | (muy + 3 * sy + 1 < 0)
            in_grid = (~off).double()
        g = g * in_grid.view(n, 1, 1)
        wj = kw[:, j, 0] * in_grid  # visible * in_grid
        if mode == "released":
            terms.append((wj ** 2).mean() * ((g - t[:, j]) ** 2).mean())
        else:
            terms.append(((wj.view(n, 1, 1) * (g - t[:, j])) ** 2).mean())
    reg = torch.stack(terms).mean()  # per-joint mean, then mean over joints
    val = torch.zeros(n, k, dtype=torch.float64)
    cd = c.detach()
    for i in range(n):
        for j in range(k):
            x, y = float(cd[i, j, 0]), float(cd[i, j, 1])
            if 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0:  # 0 outside [0, 1] (NaN is outside)
                val[i, j] = t[i, j, round(y * (h - 1)), round(x * (w - 1))]  # round(): ties to even
    wk = kw[..., 0]
    sl = (sc[..., 0] * wk - val * wk).abs().mean()
    return reg, sl


def _inputs(n, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, k, 2, generator=g) * 1.4 - 0.2
    sigma = torch.rand(n, k, 2, generator=g) * 2.5 + 0.3
    score = torch.randn(n, k, 1, generator=g)
    teacher = torch.rand(n, k, h, w, generator=g)
    kw = (torch.rand(n, k, 1, generator=g) > 0.3).float()
    if k >= 3:
        coords[0, 0] = torch.tensor([3.0, 0.5])  # wholly off the grid
        coords[0, 1] = torch.tensor([0.0, 1.0])  # exactly on the [0, 1] edges
        kw[0, 2] = 0.5  # soft weight
    return coords, sigma, score, teacher, kw


def _grads(fn, coords, sigma, score, teacher, kw, mode, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (coords, sigma, score)]
    reg, sl = fn(*leaves, teacher, kw, mode=mode, **kwargs)
    (1.3 * reg + 0.7 * sl).backward()
    return [reg.detach(), sl.detach()] + [t.grad for t in leaves]


def _close(got, want, rtol=2e-4, rel_atol=2e-5):
    want = want.double()
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rel_atol * float(want.abs().max()) + 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 5, 4), (1, 133, 2, 3)], ids=str)
def test_loss_matches_spec_text_float64_strided_inputs(shape, backend):
    """Losses and gradients against the spec text; every input a non-contiguous view (head-output
    slices, a permuted teacher, the weight a column of an (N, K, 2) tensor); K = 1, K = 133, odd H/W."""
    n, k, h, w = shape
    coords, sigma, score, teacher, kw = _inputs(*shape, seed=h * w + k)
    head = torch.cat([coords, score, sigma, torch.zeros(n, k, 1)], -1)  # (N, K, 6), like the head
    t_view = teacher.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    kw_view = torch.cat([torch.full_like(kw, 7.0), kw], -1)[..., 1:]
    assert not t_view.is_contiguous() and (k == 1 or not kw_view.is_contiguous())
    for mode in MODES:
        leaves = [head.clone().requires_grad_()]
        hd = leaves[0]
        reg, sl = dk.simulated_heatmap_loss(hd[..., 0:2], hd[..., 3:5], hd[..., 2:3], t_view, kw_view,
                                            mode=mode, backend=backend)
        (1.3 * reg + 0.7 * sl).backward()
        want = _grads(spec_losses, coords.double(), sigma.double(), score.double(), teacher, kw, mode)
        _close(reg, want[0])
        _close(sl, want[1])
        _close(hd.grad[..., 0:2], want[2])
        _close(hd.grad[..., 3:5], want[3])
        _close(hd.grad[..., 2:3], want[4])
        assert (hd.grad[..., 5] == 0).all()


def test_loss_bf16_teacher_fp32_predictions_both_backends():
    coords, sigma, score, teacher, kw = _inputs(2, 3, 5, 4, seed=1)
    tb = teacher.bfloat16()
    for mode in MODES:
        want = _grads(spec_losses, coords.double(), sigma.double(), score.double(), tb, kw, mode)
        for backend in BACKENDS:
            got = _grads(dk.simulated_heatmap_loss, coords, sigma, score, tb, kw, mode, backend=backend)
            assert got[0].dtype == got[1].dtype == torch.float32
            for a, b in zip(got, want):
                _close(a, b)


def test_reference_gradcheck_float64():
    """The reference is the float64 oracle: its autograd matches finite differences (smooth inputs)."""
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(2, 2, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    s = (torch.rand(2, 2, 2, generator=g, dtype=torch.float64) + 0.8).requires_grad_()
    sc = torch.randn(2, 2, 1, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.rand(2, 2, 4, 3, generator=g, dtype=torch.float64)
    kw = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64).view(2, 2, 1)
    for mode in MODES:
        assert torch.autograd.gradcheck(
            lambda a, b, d: dk.simulated_heatmap_loss(a, b, d, t, kw, mode=mode, backend="reference"), (c, s, sc))


# ----------------------------------------------------------------------------- bugs found by the review


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_coords_propagate_not_crash(backend):
    """NaN policy: NaN inputs propagate into the losses (not checked). A NaN coordinate made the
    reference's score gather index garbage (IndexError from gather); the kernel treats NaN as
    outside [0, 1] (score target 0)."""
    coords, sigma, score, teacher, kw = _inputs(1, 4, 5, 4, seed=3)
    coords[0, 3, 0] = float("nan")
    coords[0, 2, 1] = float("inf")
    reg, sl = dk.simulated_heatmap_loss(coords, sigma, score, teacher, kw, backend=backend)
    assert torch.isnan(reg)
    _, want = spec_losses(coords, sigma, score, teacher, kw, "released")
    _close(sl, want)
    torch.testing.assert_close(hm.teacher_value_at_prediction(coords, teacher)[0, 2:, 0], torch.zeros(2))


def test_score_gather_index_exact_for_16bit_coords():
    """round(clamp(x) * (W - 1)) of a bf16/fp16 coordinate: the product must not be rounded to the
    16-bit dtype first (bf16 turns x * 47 = 33.4 into 33.5 and rounds to 34: another pixel)."""
    h, w = 64, 48
    teacher = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    for dt in (torch.bfloat16, torch.float16):
        # values of dt in [0, 1] whose product rounded to dt picks another pixel (and a few that don't)
        x = torch.linspace(0, 1, 20001).to(dt).unique()
        moved = torch.round(x * (w - 1)).double() != torch.round(x.double() * (w - 1))
        assert moved.any()
        x = torch.cat([x[moved][:12], x[~moved][::400]])
        coords = torch.stack([x, torch.full_like(x, 0.5)], -1).view(1, -1, 2)
        k = coords.shape[1]
        t = teacher.expand(1, k, h, w).contiguous()
        want = hm.teacher_value_at_prediction(coords.double(), t)
        got = hm.teacher_value_at_prediction(coords, t)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        sc, sg, kw = torch.zeros(1, k, 1), torch.ones(1, k, 2, dtype=dt), torch.ones(1, k, 1)
        sls = [dk.simulated_heatmap_loss(coords, sg, sc, t, kw, backend=b)[1] for b in BACKENDS]
        torch.testing.assert_close(sls[0], sls[1])
        torch.testing.assert_close(sls[1], want.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtypes_follow_documented_rule_for_mixed_dtypes(backend):
    """Documented: reg2hm in coords.dtype, score loss in score.dtype, render in mu.dtype; the
    reference returned the promoted dtype (float64 sigma -> float64 loss / maps)."""
    coords, sigma, score, teacher, kw = _inputs(1, 3, 4, 5, seed=2)
    cases = [(torch.float32, torch.float64, torch.float16), (torch.bfloat16, torch.float32, torch.float64)]
    for cd, sd, scd in cases:
        reg, sl = dk.simulated_heatmap_loss(coords.to(cd), sigma.to(sd), score.to(scd), teacher, kw, backend=backend)
        assert (reg.dtype, sl.dtype) == (cd, scd)
        want_reg, want_sl = spec_losses(coords.to(cd), sigma.to(sd), score.to(scd), teacher, kw, "released")
        _close(reg, want_reg, rtol=2e-2, rel_atol=1e-2)
        _close(sl, want_sl, rtol=2e-2, rel_atol=1e-2)
        mu = coords.to(cd) * 4
        out = dk.render_gaussian_heatmaps(mu, sigma.to(sd), 4, 5, backend="triton" if backend == "cpp" else backend)
        assert out.dtype == cd


def test_loss_more_than_1024_keypoints_finalize(monkeypatch):
    """The finalize kernel's joint block was capped at 1024 and never looped over K: for K > 1024
    the joints past 1024 were dropped from both losses and their sum_i w^2 (the released-mode
    gradient scale) was never written. The per-map forward kernel is replaced by a writer of
    known statistics (the interpreter is too slow for 1000+ maps); finalize and backward run."""
    n, k, hw = 2, 1100, 6
    g = torch.Generator().manual_seed(0)
    stats = torch.rand(hmt.NUM_STATS, n, k, generator=g)
    stats[hmt.ST_ERR] -= 0.5

    class _Writer:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[5].copy_(stats)
            return launch

    monkeypatch.setattr(hmt, "_simhm_loss_fwd_kernel", _Writer())
    monkeypatch.setattr(hmt, "TILE_OVERRIDE", hmt.LossTile(0, 2, 16, 4))
    monkeypatch.setattr(hmt, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    dummy = torch.zeros(n, k, 2)
    teacher = torch.zeros(n, k, 2, 3)
    s = stats.double()
    w = s[hmt.ST_WREG]
    wk = (w * w).sum(0)
    for released in (True, False):
        reg, sl, st, wk_got = hmt.simhm_loss_fwd(dummy, dummy, dummy[..., :1], teacher, dummy[..., :1], released)
        if released:
            want_reg = ((wk / n) * (s[hmt.ST_S].sum(0) / (n * hw))).mean()
        else:
            want_reg = (w * w * s[hmt.ST_S]).sum() / (n * k * hw)
        _close(reg, want_reg, rtol=1e-5)
        _close(sl, s[hmt.ST_ERR].abs().mean(), rtol=1e-5)
        _close(wk_got, wk, rtol=1e-5)
        gc, gs, gsc = hmt.simhm_loss_bwd(torch.tensor(1.0), torch.tensor(1.0), st, wk_got, torch.float32,
                                         torch.float32, torch.float32, hw, released)
        scale = (wk / (k * n * n * hw)).expand(n, k) if released else w * w / (n * k * hw)
        _close(gc[..., 0], scale * s[hmt.ST_DCX], rtol=1e-5)
        _close(gs[..., 1], scale * s[hmt.ST_DSY], rtol=1e-5)
        _close(gsc[..., 0], torch.sign(s[hmt.ST_ERR]) * s[hmt.ST_WSCORE] / (n * k), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + (None,))
def test_missing_score_error_names_the_argument(backend):
    coords, sigma, score, teacher, kw = _inputs(1, 3, 4, 5, seed=2)
    with pytest.raises(TypeError, match="score: expected a torch.Tensor"):
        dk.simulated_heatmap_loss(coords, sigma, None, teacher, kw, backend=backend)
    with pytest.raises(TypeError, match="score: expected a torch.Tensor"):
        hm.simulated_heatmap_loss_reference(coords, sigma, None, teacher, kw)


def test_auto_keeps_float64_inputs_on_the_float64_reference(monkeypatch):
    """The kernels compute in fp32: where "auto" would pick them (CUDA), float64 predictions go to
    the reference instead, so the loss and the maps keep float64 accuracy."""
    from distilpose_kernels import heatmap as hm_mod

    monkeypatch.setattr(hm_mod, "select_triton_backend", lambda *a, **k: "triton")
    g = torch.Generator().manual_seed(5)
    n, k, h, w = 2, 3, 9, 7
    coords = (torch.rand(n, k, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    sigma = (torch.rand(n, k, 2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    score = torch.rand(n, k, 1, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.rand(n, k, h, w, generator=g, dtype=torch.float64)
    kw = torch.ones(n, k, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, s, sc: dk.simulated_heatmap_loss(c, s, sc, teacher, kw),
                                    (coords, sigma, score))
    mu = torch.rand(n, k, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1.0, h - 1.0], dtype=torch.float64)
    maps = dk.render_gaussian_heatmaps(mu, sigma.detach(), h, w)
    want = hm.render_gaussian_heatmaps_reference(mu, sigma.detach(), h, w)
    assert maps.dtype == torch.float64 and torch.equal(maps, want)
