"""Adversarial checks of token_attention and add_pos_layernorm: odd shapes, strided views,
mixed dtypes, autocast, non-finite inputs, zero sizes, bad arguments.

Triton tests pass backend="triton" so the kernels run on the CPU under TRITON_INTERPRET=1
(conftest.py). Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import attention as attn_mod
from test_attention import _ref_fwd_bwd, _triton_fwd_bwd

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _apln_run(fn, x, pos, w, b, res, gxo, gy):
    """(x_out, y, grads of every non-None input) of fn(x, pos, w, b, residual=res); leaves keep
    the given tensors' strides (views of fresh leaves)."""
    leaves, views = [], []
    for t in (x, pos, w, b, res):
        if t is None:
            views.append(None)
            continue
        base = t._base if t._base is not None else t
        leaf = base.detach().clone().requires_grad_()
        leaves.append(leaf)
        views.append(leaf.as_strided(t.shape, t.stride(), t.storage_offset()))
    xo, y = fn(*views[:4], residual=views[4])
    grads = torch.autograd.grad((xo * gxo.to(xo.dtype)).sum() + (y * gy.to(y.dtype)).sum(), leaves)
    return xo.detach(), y.detach(), grads


def _tri(*a, residual=None):
    return dk.add_pos_layernorm(*a, backend="triton", residual=residual)


def _ref64(*a, residual=None):
    a = [None if t is None else t.double() for t in a]
    return attn_mod.add_pos_layernorm_reference(*a, residual=None if residual is None else residual.double())


# ----------------------------------------------------------------------------- token_attention


@pytest.mark.parametrize(
    "n,L,h,d",
    [(1, 1, 1, 24), (1, 17, 1, 24), (2, 33, 1, 8), (1, 65, 2, 40), (1, 5, 1, 1), (1, 6, 1, 136)],
)
def test_attention_odd_shapes_transposed_input_vs_float64(n, L, h, d):
    """L = 1 / just above a power of two, head dims below 16, non-power-of-two and > 128; qkv a
    transposed (L, N, 3C) buffer."""
    g = torch.Generator().manual_seed(L * 31 + d)
    qkv = torch.randn(L, n, 3 * h * d, generator=g).to(DEV).transpose(0, 1)
    dout = torch.randn(n, L, h * d, generator=g).to(DEV)
    out, gq = _triton_fwd_bwd(qkv, h, dout)
    out_r, g_r = _ref_fwd_bwd(qkv, h, dout)
    assert out.dtype == gq.dtype == torch.float32 and out.shape == (n, L, h * d) and gq.shape == qkv.shape
    torch.testing.assert_close(out.double(), out_r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gq.double(), g_r, atol=5e-5, rtol=1e-4)


def test_attention_zero_sizes():
    for shape, h in (((0, 5, 96), 2), ((2, 0, 96), 2), ((2, 3, 0), 1)):
        qkv = torch.randn(shape, device=DEV, requires_grad=True)
        for be in ("triton", "reference"):
            out = dk.token_attention(qkv, h, backend=be)
            assert out.shape == (shape[0], shape[1], shape[2] // 3)
            (g,) = torch.autograd.grad(out.sum(), qkv, allow_unused=True)
            assert g is None or g.shape == qkv.shape


def test_attention_bad_scale_names_the_argument():
    qkv = torch.randn(1, 3, 48)
    for be in ("triton", "reference", None):
        with pytest.raises(TypeError, match=r"scale: expected a real number or None, got 'x'"):
            dk.token_attention(qkv, 2, scale="x", backend=be)
    with pytest.raises(TypeError, match=r"scale: expected a real number or None"):
        dk.token_attention_reference(qkv, 2, scale=[0.1])


@pytest.mark.parametrize("src", [torch.float32, torch.float16])
def test_attention_autocast_dtype_matches_reference(src):
    """Under autocast the reference's einsums run in the autocast dtype; the kernels must return
    that dtype too (not qkv's), with the gradient back in qkv's dtype."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 7, 3 * 2 * 24, generator=g).to(device=DEV, dtype=src)
    dt = torch.bfloat16
    outs = {}
    for be in ("reference", "triton"):
        x = qkv.clone().requires_grad_()
        with torch.autocast(DEV, dtype=dt):
            out = dk.token_attention(x, 2, backend=be)
        (gx,) = torch.autograd.grad(out.float().square().sum(), x)
        outs[be] = (out, gx)
    (o_r, g_r), (o_t, g_t) = outs["reference"], outs["triton"]
    assert o_t.dtype == o_r.dtype == dt
    assert g_t.dtype == g_r.dtype == src
    o64, _ = _ref_fwd_bwd(qkv.to(dt), 2, torch.zeros(2, 7, 48, device=DEV))
    torch.testing.assert_close(o_t.double(), o64, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g_t.float(), g_r.float(), atol=5e-2, rtol=5e-2)
    # float64 is left alone by autocast (and so goes to the reference, in float64)
    with torch.autocast(DEV, dtype=dt):
        assert dk.token_attention(qkv.double(), 2).dtype == torch.float64


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_attention_nonfinite_stays_in_its_rows_and_heads():
    """NaN policy: NaN/inf in one (batch, head) leave the other batches/heads finite, forward and
    backward, with the same finite pattern as the float64 reference."""
    n, L, h, d = 2, 17, 2, 24
    for val in (float("nan"), float("inf")):
        for col in (5, 48 + 5, 96 + 5):  # q, k, v of head 0
            qkv = torch.randn(n, L, 3 * h * d, device=DEV)
            qkv[0, 3, col] = val
            dout = torch.randn(n, L, h * d, device=DEV)
            out, g = _triton_fwd_bwd(qkv, h, dout)
            out_r, g_r = _ref_fwd_bwd(qkv, h, dout)
            assert torch.equal(torch.isfinite(out), torch.isfinite(out_r)), (val, col)
            assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, :, d:]).all()
            assert torch.isfinite(g[1]).all()
            fin = torch.isfinite(g_r)
            assert torch.equal(torch.isfinite(g), fin), (val, col)
            torch.testing.assert_close(g[fin].double(), g_r[fin], atol=5e-5, rtol=1e-4)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("blocks", [(16, 16, 2), (16, 16, 3)])
def test_attention_split_keys_odd_shapes_and_nonfinite(blocks, monkeypatch):
    """The split-key forward (batch-1 inference launches) on the odd shapes above and with the
    NaN policy's inputs: the same values and the same finite pattern as float64 (an inf key
    poisons its slice's max; the merge carries that into the row, as the one-pass kernel does)."""
    from distilpose_kernels import attention_triton as at

    monkeypatch.setattr(at, "BLOCK_OVERRIDE", blocks)
    for n, L, h, d in [(1, 1, 1, 24), (2, 33, 1, 8), (1, 65, 2, 40), (1, 6, 1, 136)]:
        g = torch.Generator().manual_seed(L * 31 + d)
        qkv = torch.randn(L, n, 3 * h * d, generator=g).to(DEV).transpose(0, 1)
        dout = torch.randn(n, L, h * d, generator=g).to(DEV)
        out, gq = _triton_fwd_bwd(qkv, h, dout)
        out_r, g_r = _ref_fwd_bwd(qkv, h, dout)
        torch.testing.assert_close(out.double(), out_r, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(gq.double(), g_r, atol=5e-5, rtol=1e-4)
    n, L, h, d = 2, 37, 2, 24
    for val in (float("nan"), float("inf")):
        for col in (5, 48 + 5, 96 + 5):  # q, k, v of head 0
            qkv = torch.randn(n, L, 3 * h * d, device=DEV)
            qkv[0, 20, col] = val  # in the second key slice
            out = dk.token_attention(qkv, h, backend="triton")
            out_r = dk.token_attention_reference(qkv.double(), h)
            assert torch.equal(torch.isfinite(out), torch.isfinite(out_r)), (val, col)
            fin = torch.isfinite(out_r)
            torch.testing.assert_close(out[fin].double(), out_r[fin], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- add_pos_layernorm


def test_apln_strided_weight_and_bias_views():
    """LayerNorm weight / bias that are strided views (columns of a (C, 2) table) are read
    through their strides in the forward and the backward."""
    g = torch.Generator().manual_seed(0)
    n, L, p, c = 2, 6, 4, 24
    x = torch.randn(n, L, c, generator=g).to(DEV)
    pos = torch.randn(p, c, generator=g).to(DEV)
    wb = torch.randn(c, 2, generator=g).to(DEV)
    w, b = wb[:, 0], wb[:, 1]
    assert w.stride() == (2,)
    gxo, gy = torch.randn(n, L, c, generator=g).to(DEV), torch.randn(n, L, c, generator=g).to(DEV)
    xo, y, gr = _apln_run(_tri, x, pos, w, b, None, gxo, gy)
    xo_r, y_r, gr_r = _apln_run(_ref64, x, pos, w, b, None, gxo, gy)
    torch.testing.assert_close(y.double(), y_r, atol=2e-5, rtol=1e-5)
    for name, a, bb in zip(("dx", "dpos", "dwb"), gr, gr_r):
        torch.testing.assert_close(a.double(), bb.double(), atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # the kernels-only path
        _, y_n = dk.add_pos_layernorm(x, pos, w, b, backend="triton")
    torch.testing.assert_close(y_n, y, atol=0, rtol=0)


def test_apln_strided_weight_opcheck():
    x = torch.randn(2, 5, 24, requires_grad=True)
    wb = torch.randn(24, 2)
    w, b = (wb[:, 0].clone().requires_grad_(), wb[:, 1].clone().requires_grad_())
    wv = torch.randn(48)[::2].requires_grad_()  # a strided leaf
    torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default, (x, torch.randn(1, 3, 24), wv, b, 1e-5))
    torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default, (x, None, w, wv, 1e-5))


@pytest.mark.parametrize(
    "name",
    ["pos_T", "pos_table_view", "pos_expand", "x_T", "res_expand", "pos_1PC_strided"],
)
def test_apln_strided_views_vs_float64(name):
    g = torch.Generator().manual_seed(7)
    n, L, p, c = 2, 6, 4, 24
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    x, pos, w, b, res = r(n, L, c), r(p, c), r(c), r(c), r(n, L, c)
    if name == "pos_T":
        pos = r(c, p).t()
    elif name == "pos_table_view":
        pos = r(10, c)[3:3 + p]
    elif name == "pos_expand":
        pos = r(1, c).expand(p, c)
    elif name == "x_T":
        x = r(c, L, n).permute(2, 1, 0)
    elif name == "res_expand":
        res = r(1, 1, c).expand(n, L, c)
    elif name == "pos_1PC_strided":
        pos = r(1, p, 2 * c)[..., ::2]
    gxo, gy = r(n, L, c), r(n, L, c)
    xo, y, gr = _apln_run(_tri, x, pos, w, b, res, gxo, gy)
    xo_r, y_r, gr_r = _apln_run(_ref64, x, pos, w, b, res, gxo, gy)
    torch.testing.assert_close(xo.double(), xo_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.double(), y_r, atol=2e-5, rtol=1e-5)
    for a, bb in zip(gr, gr_r):
        torch.testing.assert_close(a.double(), bb.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "xdt,pdt",
    [(torch.float32, torch.float64), (torch.float32, torch.float16), (torch.bfloat16, torch.float16),
     (torch.float16, torch.float32)],
)
def test_apln_mixed_parameter_dtypes_same_on_every_backend(xdt, pdt):
    """LayerNorm parameters in another dtype than x: every backend returns x's dtype (outputs) and
    the parameters' dtype (their gradients), with the same values."""
    g = torch.Generator().manual_seed(1)
    n, L, p, c = 2, 5, 3, 24
    x = torch.randn(n, L, c, generator=g).to(DEV, xdt)
    pos = torch.randn(p, c, generator=g).to(DEV, xdt)
    w, b = (torch.randn(c, generator=g).to(DEV, pdt) for _ in range(2))
    gxo, gy = torch.randn(n, L, c, generator=g).to(DEV), torch.randn(n, L, c, generator=g).to(DEV)
    got = {}
    for be in ("triton", "reference"):
        fn = lambda *a, residual=None, be=be: dk.add_pos_layernorm(*a, backend=be, residual=residual)  # noqa: E731
        got[be] = _apln_run(fn, x, pos, w, b, None, gxo, gy)
    (xo, y, gt), (xo_r, y_r, gr) = got["triton"], got["reference"]
    assert xo.dtype == y.dtype == xo_r.dtype == y_r.dtype == xdt
    assert [t.dtype for t in gt] == [t.dtype for t in gr] == [xdt, xdt, pdt, pdt]
    tol = 1e-5 if xdt == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), y_r.float(), atol=tol, rtol=tol)
    for a, bb in zip(gt, gr):
        torch.testing.assert_close(a.double(), bb.double(), atol=10 * tol, rtol=10 * tol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_apln_nonfinite_pattern_matches_reference():
    """NaN policy: a NaN/inf in x, pos, weight, bias, residual or an incoming gradient makes the same
    elements non-finite as PyTorch's LayerNorm does (padded columns: C=24 < BLOCK_C=32)."""
    g = torch.Generator().manual_seed(2)
    n, L, p, c = 2, 5, 3, 24
    for trial in range(14):
        ins = [torch.randn(*s, generator=g).to(DEV) for s in ((n, L, c), (p, c), (c,), (c,), (n, L, c))]
        gxo, gy = torch.randn(n, L, c, generator=g).to(DEV), torch.randn(n, L, c, generator=g).to(DEV)
        t = (ins + [gy, gxo])[trial % 7]
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = (float("nan"), float("inf"))[trial % 2]
        got = _apln_run(_tri, *ins, gxo, gy)
        want = _apln_run(lambda *a, residual=None: attn_mod.add_pos_layernorm_reference(*a, residual=residual),
                         *ins, gxo, gy)
        for a, bb in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
            assert torch.equal(torch.isfinite(a), torch.isfinite(bb)), trial
            fin = torch.isfinite(bb)
            torch.testing.assert_close(a[fin], bb[fin], atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's 0/0 statistics at C=0 (not stored)
def test_apln_zero_sizes():
    for n, L, p, c in ((0, 5, 3, 16), (2, 4, 0, 16), (2, 3, 1, 0)):
        x = torch.randn(n, L, c, device=DEV, requires_grad=True)
        pos = torch.randn(p, c, device=DEV, requires_grad=True)
        w = torch.randn(c, device=DEV, requires_grad=True)
        for be in ("triton", "reference"):
            xo, y = dk.add_pos_layernorm(x, pos, w, None, backend=be)
            assert xo.shape == y.shape == (n, L, c)
            grads = torch.autograd.grad((xo.sum() + y.sum()), (x, pos, w))
            assert [t.shape for t in grads] == [x.shape, pos.shape, w.shape]
            assert all(torch.isfinite(t).all() for t in grads)
