"""Adversarial checks of the GEMM ops (linear, linear_gelu, fused_mlp, linear_add_norm,
fused_mlp_add_norm) against float64 PyTorch written here: odd and degenerate shapes, strided
operands, mixed dtypes, autocast, inf, second derivatives, registration. Tiny shapes: the
Triton kernels run under the CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from distilpose_kernels import mlp as mlp_mod

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_tile(monkeypatch):
    if DEV == "cpu":  # 16-wide tiles: the shapes below cross tile edges (and GROUP_M groups)
        from distilpose_kernels import mlp_triton

        monkeypatch.setattr(mlp_triton, "TILE_OVERRIDE", mlp_triton.GemmTile(16, 16, 16, 4, 1))
        monkeypatch.setattr(mlp_triton, "MLP_TILE_OVERRIDE", mlp_triton.RowTile(16, 16, 4, 1))
        monkeypatch.setattr(mlp_triton, "ADD_NORM_TILE_OVERRIDE", mlp_triton.RowTile(16, 16, 4, 1))


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: every element must be written."""
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(
        shape, float("nan"), device=device, dtype=dtype))


def _r(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _dev(t, dtype=torch.float32):
    return None if t is None else t.to(device=DEV, dtype=dtype)


def _strided(t):
    """The same values as a non-contiguous view (every other element of a 2x larger tensor)."""
    if t is None:
        return None
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def _wt(w):
    """w with transposed (column-major) strides."""
    return w.t().contiguous().t()


def _gelu64(z):
    return 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))


def _close(got, want, tol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.double(), want.to(got.device), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("shape,k,n", [
    ((1,), 5, 1),  # one row, one output column
    ((17,), 33, 17),  # one past the 16-tile in every dimension
    ((150,), 8, 40),  # 10 row tiles x 3 column tiles: two GROUP_M=8 program groups, the second short
    ((2, 3, 4), 20, 9),  # 4-D input
    ((), 7, 3),  # 1-D input
])
def test_linear_ops_shapes_and_transposed_weight_vs_float64(shape, k, n, poisoned):
    g = torch.Generator().manual_seed(k * n)
    x, w, b = _r(g, *shape, k), _r(g, n, k, scale=k ** -0.5), _r(g, n)
    for bias in (b, None):
        want = x @ w.t() + (0 if bias is None else bias)
        _close(dk.linear(_dev(x), _wt(_dev(w)), _dev(bias), backend="triton"), want)
        _close(dk.linear_gelu(_dev(x), _wt(_dev(w)), _dev(bias), backend="triton"), _gelu64(want))


@pytest.mark.parametrize("shape,k,hid,n", [
    ((1,), 3, 1, 1),
    ((2, 2, 5), 17, 33, 7),  # 4-D input, hidden width one past two 16-column chunks
    ((3,), 9, 20, 512),  # the widest output the row kernel takes
])
def test_fused_mlp_shapes_and_transposed_weights_vs_float64(shape, k, hid, n, poisoned):
    g = torch.Generator().manual_seed(hid + n)
    x, w1, b1 = _r(g, *shape, k), _r(g, hid, k, scale=k ** -0.5), _r(g, hid)
    w2, b2 = _r(g, n, hid, scale=hid ** -0.5), _r(g, n)
    want = _gelu64(x @ w1.t() + b1) @ w2.t() + b2
    _close(dk.fused_mlp(_dev(x), _wt(_dev(w1)), _dev(b1), _wt(_dev(w2)), _dev(b2), backend="triton"), want)


@pytest.mark.parametrize("hid", [None, 20])
def test_add_norm_ops_full_width_and_one_above(hid, poisoned):
    """N = MLP_MAX_N runs the kernel (one 512-wide row block); N + 1 is refused by name with
    backend='triton' and runs the reference with 'auto'."""
    g = torch.Generator().manual_seed(3)
    n, (b, L, k) = mlp_mod.MLP_MAX_N, (1, 3, 8)
    x, res, lw, lb, pos = _r(g, b, L, k), _r(g, b, L, n), _r(g, n), _r(g, n), _r(g, 1, 2, n)
    ws = [_r(g, hid, k), _r(g, hid), _r(g, n, hid, scale=0.2), _r(g, n)] if hid else [_r(g, n, k), _r(g, n)]
    fn = dk.fused_mlp_add_norm if hid else dk.linear_add_norm

    def out64(ws):
        return (_gelu64(x @ ws[0].t() + ws[1]) @ ws[2].t() + ws[3]) if hid else x @ ws[0].t() + ws[1]

    want_x = res + out64(ws)
    want_x[:, -2:] += pos[0]
    want_y = F.layer_norm(want_x, (n,), lw, lb, 1e-5)
    got = fn(_dev(x), *map(_dev, ws), _dev(res), _dev(lw), _dev(lb), 1e-5, _dev(pos), backend="triton")
    _close(got[0], want_x)
    _close(got[1], want_y, 5e-5)
    wide = [torch.cat([w, w[:1]]) if w.shape[0] == n else w for w in ws]
    res_w = torch.cat([res, res[..., :1]], -1)
    with pytest.raises(ValueError, match=f"{'fc2_weight' if hid else 'weight'}: backend='triton' supports at most "
                                         f"512 output features, got 513"):
        fn(_dev(x), *map(_dev, wide), _dev(res_w), None, None, backend="triton")
    _close(fn(_dev(x), *map(_dev, wide), _dev(res_w), None, None)[0], res_w + out64(wide))


def test_zero_size_batches(poisoned):
    x = torch.randn(2, 0, 8, device=DEV)
    w, w1, w2 = torch.randn(5, 8, device=DEV), torch.randn(6, 8, device=DEV), torch.randn(5, 6, device=DEV)
    assert dk.linear(x, w, backend="triton").shape == (2, 0, 5)
    assert dk.linear_gelu(x, w, backend="triton").shape == (2, 0, 5)
    assert dk.fused_mlp(x, w1, None, w2, None, backend="triton").shape == (2, 0, 5)
    res = torch.randn(2, 0, 5, device=DEV)
    assert [t.shape for t in dk.linear_add_norm(x, w, None, res, None, None, backend="triton")] == [(2, 0, 5)] * 2
    assert [t.shape for t in dk.fused_mlp_add_norm(x, w1, None, w2, None, res, None, None,
                                                   backend="triton")] == [(2, 0, 5)] * 2


# ----------------------------------------------------------------------------- bugs found in review


def test_strided_biases_and_norm_parameters(poisoned):
    """Bias, fc1/fc2 biases and the LayerNorm weight / bias given as non-contiguous views (all 1-D
    of the right shape, so the checks accept them): the kernels must honour their strides (they
    used to read them as contiguous)."""
    g = torch.Generator().manual_seed(1)
    x, w, b = _r(g, 5, 24), _r(g, 20, 24, scale=0.2), _r(g, 20)
    _close(dk.linear(_dev(x), _dev(w), _strided(_dev(b)), backend="triton"), x @ w.t() + b)
    _close(dk.linear_gelu(_dev(x), _dev(w), _strided(_dev(b)), backend="triton"), _gelu64(x @ w.t() + b))
    w1, b1, w2 = _r(g, 36, 24, scale=0.2), _r(g, 36), _r(g, 20, 36, scale=0.2)
    hidden = _gelu64(x @ w1.t() + b1)
    _close(dk.fused_mlp(_dev(x), _dev(w1), _strided(_dev(b1)), _dev(w2), _strided(_dev(b)), backend="triton"),
           hidden @ w2.t() + b)
    x3, res, lw, lb = x.reshape(1, 5, 24), _r(g, 1, 5, 20), _r(g, 20), _r(g, 20)
    for out, got in ((x3 @ w.t() + b, dk.linear_add_norm(
            _dev(x3), _dev(w), _strided(_dev(b)), _dev(res), _strided(_dev(lw)), _strided(_dev(lb)),
            backend="triton")),
                     (hidden.reshape(1, 5, 36) @ w2.t() + b, dk.fused_mlp_add_norm(
            _dev(x3), _dev(w1), _strided(_dev(b1)), _dev(w2), _strided(_dev(b)), _dev(res), _strided(_dev(lw)),
            _strided(_dev(lb)), backend="triton"))):
        _close(got[0], res + out)
        _close(got[1], F.layer_norm(res + out, (20,), lw, lb, 1e-5), 2e-5)


@pytest.mark.parametrize("op", ["linear", "mlp"])
def test_add_norm_outputs_are_in_the_residual_dtype_on_every_backend(op):
    """x_out and y come out in the residual's dtype (the kernel's contract and the fake kernel's),
    also from the reference: a float32 x or position table with a bfloat16 residual used to make
    the reference return float32 (torch.library.opcheck failed on the fake kernel, and the
    backends disagreed on the dtype)."""
    g = torch.Generator().manual_seed(2)
    x, res, pos = _dev(_r(g, 2, 5, 8)), _dev(_r(g, 2, 5, 16), torch.bfloat16), _dev(_r(g, 2, 16))
    if op == "mlp":
        ws = [_dev(_r(g, 12, 8)), None, _dev(_r(g, 16, 12, scale=0.3)), None]
        fn, lib = dk.fused_mlp_add_norm, torch.ops.distilpose.fused_mlp_add_norm.default
    else:
        ws = [_dev(_r(g, 16, 8)), None]
        fn, lib = dk.linear_add_norm, torch.ops.distilpose.linear_add_norm.default
    for xx, ww, pp in ((x, ws, None), (x.bfloat16(), [None if w is None else w.bfloat16() for w in ws], pos)):
        outs = [fn(xx, *ww, res, None, None, 1e-5, pp, backend=be) for be in ("reference", "triton")]
        for (a, b) in zip(*outs):
            assert a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)  # bf16 roundings differ
        torch.library.opcheck(lib, (xx, *ww, res, None, None, pp, 1e-5, "reference"))


@pytest.mark.parametrize("res_dtype,norm_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_add_norm_norm_parameters_of_another_dtype(res_dtype, norm_dtype):
    """LayerNorm weight / bias of another floating dtype than the residual (the checks accept any):
    the reference (what 'auto' runs on a CPU) used to fail in F.layer_norm ("mixed dtype")
    where the kernel computes in fp32."""
    g = torch.Generator().manual_seed(9)
    x, w, res = _r(g, 2, 3, 8), _r(g, 6, 8, scale=0.3), _r(g, 2, 3, 6)
    lw, lb = (_r(g, 6).to(norm_dtype).double() for _ in range(2))  # values exact in norm_dtype
    res = res.to(res_dtype).double()
    want_x = res + x @ w.t()
    want_y = F.layer_norm(want_x.to(res_dtype).double(), (6,), lw, lb, 1e-5)
    for be in ("reference", "triton", None):
        xo, y = dk.linear_add_norm(_dev(x, res_dtype), _dev(w, res_dtype), None, _dev(res, res_dtype),
                                   _dev(lw, norm_dtype), _dev(lb, norm_dtype), backend=be)
        assert xo.dtype == y.dtype == res_dtype
        tol = 1e-5 if res_dtype == torch.float32 else 3e-2
        _close(y, want_y, tol)


def test_add_norm_pos_with_no_rows():
    """pos (0, N): nothing to add (the reference used to fail reshaping it)."""
    g = torch.Generator().manual_seed(4)
    x, w, res = _dev(_r(g, 2, 3, 8)), _dev(_r(g, 6, 8)), _dev(_r(g, 2, 3, 6))
    want = dk.linear_add_norm(x, w, None, res, None, None, backend="reference")
    for be in ("reference", "triton"):
        for a, b in zip(dk.linear_add_norm(x, w, None, res, None, None, 1e-5, torch.zeros(0, 6, device=DEV),
                                           backend=be), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zero_inner_dimension_forward_and_backward():
    """K = 0: x @ weight^T is zero, the outputs are the biases (as F.linear); the flattening
    ``reshape(-1, 0)`` used to fail in the forward and the backward."""
    x = torch.zeros(2, 3, 0, device=DEV, requires_grad=True)
    w, b = torch.zeros(4, 0, device=DEV, requires_grad=True), torch.randn(4, device=DEV, requires_grad=True)
    w2, b2 = torch.randn(5, 4, device=DEV), torch.randn(5, device=DEV)
    want = b.detach().double().expand(2, 3, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _close(dk.linear(x, w, b, backend="triton"), want)
            _close(dk.linear_gelu(x, w, b, backend="triton"), _gelu64(want))
            got = dk.fused_mlp(x, w, b, w2, b2, backend="triton")
            _close(got, _gelu64(want) @ w2.double().t() + b2.double())
    got.sum().backward()
    b64 = b.detach().double().requires_grad_()
    (F.gelu(b64.expand(2, 3, 4)) @ w2.double().t()).sum().backward()
    _close(b.grad, b64.grad)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    res = torch.randn(2, 3, 4, device=DEV)
    _close(dk.linear_add_norm(x.detach(), w.detach(), b.detach(), res, None, None, backend="triton")[0],
           res.double() + want)


def test_autocast_leaves_float64_alone():
    """Autocast does not cast float64 tensors (F.linear under autocast stays in float64); the ops
    used to cast them to the autocast dtype."""
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, 8), (5, 8), (5,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b)
        assert want.dtype == torch.float64
        torch.testing.assert_close(dk.linear(x, w, b), want)
        torch.testing.assert_close(dk.linear_gelu(x, w, b), F.gelu(want))
        torch.testing.assert_close(dk.fused_mlp(x, w, b, w.t(), None), F.linear(F.gelu(want), w.t()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_fused_mlp_inf_input_is_inf_not_nan(poisoned):
    """An inf input whose outputs are +inf in float64 (positive weights): the hidden chunk's padded
    columns (hidden width 20, not a multiple of the chunk) used to turn it into NaN (inf * 0)."""
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(3, 1, 8, dtype=torch.float64)
    x[1, 0, 2] = float("inf")
    w1, w2 = (torch.rand(*s, generator=g, dtype=torch.float64) + 0.1 for s in ((20, 8), (6, 20)))
    want = _gelu64(x @ w1.t()) @ w2.t()
    assert torch.isposinf(want[1]).all() and torch.isfinite(want[[0, 2]]).all()
    _close(dk.fused_mlp(_dev(x), _dev(w1), None, _dev(w2), None, backend="triton"), want)
    res = torch.zeros(3, 1, 6, dtype=torch.float64)
    xo, y = dk.fused_mlp_add_norm(_dev(x), _dev(w1), None, _dev(w2), None, _dev(res), None, None, backend="triton")
    _close(xo, want)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()  # LayerNorm of an inf row


@pytest.mark.parametrize("op", ["linear_gelu", "fused_mlp"])
def test_float64_double_backward(op):
    """The registered backwards are differentiable at the inputs' precision: the GELU derivative
    used to be computed in float32 for float64 inputs (first derivative only fp32-accurate,
    gradgradcheck failed)."""
    g = torch.Generator().manual_seed(6)
    x, w, b = (_r(g, 3, 5).to(DEV).requires_grad_(), _r(g, 4, 5).to(DEV).requires_grad_(),
               _r(g, 4).to(DEV).requires_grad_())
    args = (x, w, b) if op == "linear_gelu" else (x, w, b, _r(g, 2, 4).to(DEV).requires_grad_(), None)
    lib = getattr(torch.ops.distilpose, op)
    fn = lambda *t: lib(*t, "reference")  # noqa: E731
    ref = (lambda x, w, b: _gelu64(F.linear(x, w, b))) if op == "linear_gelu" else \
        (lambda x, w, b, w2, b2: F.linear(_gelu64(F.linear(x, w, b)), w2))
    leaves = [a for a in args if a is not None]
    got = torch.autograd.grad(fn(*args).square().sum(), leaves)
    want = torch.autograd.grad(ref(*args).square().sum(), leaves)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(fn, args)


# ----------------------------------------------------------------------------- gradients, compile


def test_gradients_4d_transposed_weight_vs_float64():
    """Backward through the kernel path (fp32) with a 4-D input and a transposed weight,
    against float64 autograd of the plain ops."""
    g = torch.Generator().manual_seed(7)
    x, w, b, w2 = _r(g, 2, 3, 2, 9), _r(g, 11, 9, scale=0.3), _r(g, 11), _r(g, 4, 11, scale=0.3)
    go1, go2 = _r(g, 2, 3, 2, 11), _r(g, 2, 3, 2, 4)
    cases = [
        (lambda x, w, b: dk.linear(x, w, b, backend="triton"), lambda x, w, b: F.linear(x, w, b), (x, w, b), go1),
        (lambda x, w, b: dk.linear_gelu(x, w, b, backend="triton"), lambda x, w, b: _gelu64(F.linear(x, w, b)),
         (x, w, b), go1),
        (lambda x, w, b, w2: dk.fused_mlp(x, w, b, w2, None, backend="triton"),
         lambda x, w, b, w2: F.linear(_gelu64(F.linear(x, w, b)), w2), (x, w, b, w2), go2),
    ]
    for fn, ref, args, go in cases:
        leaves = [(_wt(_dev(a)) if a.dim() == 2 else _dev(a)).requires_grad_() for a in args]
        got = torch.autograd.grad(fn(*leaves), leaves, _dev(go))
        a64 = [a.clone().requires_grad_() for a in args]
        want = torch.autograd.grad(ref(*a64), a64, go)
        for a, c in zip(got, want):
            _close(a, c, 2e-5)


def test_compile_fullgraph_all_ops_under_autocast():
    """fullgraph=True (a graph break raises) over all five ops, under CPU autocast (bf16), with
    the outputs matching the eager calls."""
    if DEV != "cpu":
        pytest.skip("CPU autocast")
    g = torch.Generator().manual_seed(8)
    x, w, b = _dev(_r(g, 2, 5, 8)), _dev(_r(g, 8, 8, scale=0.3)), _dev(_r(g, 8))
    res, lw = _dev(_r(g, 2, 5, 8)), _dev(_r(g, 8))

    def f(x):
        y = dk.linear(x, w, b, backend="triton")
        y = dk.linear_gelu(y, w, None, backend="triton")
        y = dk.fused_mlp(y, w, b, w, None, backend="triton")
        xo, y = dk.linear_add_norm(y, w, b, res, lw, None, backend="triton")
        return dk.fused_mlp_add_norm(y, w, None, w, b, xo, None, lw, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got, want = compiled(x), f(x)
    for a, c in zip(got, want):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


def test_error_messages_name_the_argument():
    x, w = torch.randn(2, 3, 8, device=DEV), torch.randn(4, 8, device=DEV)
    cases = [
        (lambda: dk.linear(torch.tensor(1.0, device=DEV), w), ValueError, r"x: expected at least 1 dimension"),
        (lambda: dk.linear(x, [[1.0] * 8] * 4), TypeError, "weight: expected a torch.Tensor, got list"),
        (lambda: dk.linear_gelu(x, w.t()), ValueError, r"weight: expected shape \(\*, 8\), got \(8, 4\)"),
        (lambda: dk.fused_mlp(x, w, None, w, None), ValueError, r"fc2_weight: expected shape \(\*, 4\), got \(4, 8\)"),
        (lambda: dk.fused_mlp(x, w, torch.randn(3, device=DEV), w.t(), None), ValueError,
         r"fc1_bias: expected shape \(4\), got \(3,\)"),
        (lambda: dk.linear_add_norm(x, w, None, torch.randn(2, 3, 4, device=DEV), torch.randn(5, device=DEV), None),
         ValueError, r"norm_weight: expected shape \(4\), got \(5,\)"),
        (lambda: dk.linear_add_norm(x, w, None, torch.randn(2, 3, 4, device=DEV), None, None,
                                    pos=torch.randn(2, 1, 4, device=DEV)), ValueError,
         r"pos: expected shape \(1, P, 4\) or \(P, 4\), got \(2, 1, 4\)"),
        (lambda: dk.linear_add_norm(x, w, None, torch.randn(2, 3, 4, device=DEV).half(), None,
                                    torch.ones(4, device=DEV, dtype=torch.int32)), TypeError,
         "norm_bias: expected a floating-point tensor"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_tiles_random_shapes_strides_and_nan(seed, poisoned, monkeypatch):
    """The split tiles of linear_gelu, linear_add_norm and fused_mlp_add_norm (small-launch
    kernels whose last program of a block sums fp32 partials) at random odd shapes with strided
    operands, against float64; a NaN in one input row stays in that row's outputs."""
    from distilpose_kernels import mlp_triton as mt

    g = torch.Generator().manual_seed(100 + seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    b, L, k, hid, n = ri(1, 3), ri(1, 21), ri(1, 41), ri(1, 50), ri(1, 40)
    p = ri(0, L + 1)
    monkeypatch.setattr(mt, "TILE_OVERRIDE", mt.GemmTile(16, 16, 16, 4, 1, ri(2, 4)))
    monkeypatch.setattr(mt, "ADD_NORM_TILE_OVERRIDE", mt.SplitTile(16, 16, 16, ri(2, 4), 4, 1))
    monkeypatch.setattr(mt, "MLP_TILE_OVERRIDE", mt.SplitMlpTile(16, 16, ri(2, 5), 4, 1))
    x = _r(g, b, L, k)
    x[0, L - 1, 0] = float("nan")
    w1, b1, w2, b2 = _r(g, hid, k, scale=k ** -0.5), _r(g, hid), _r(g, n, hid, scale=hid ** -0.5), _r(g, n)
    wl, bl = _r(g, n, k, scale=k ** -0.5), _r(g, n)
    res, lw, lb = _r(g, b, L, n), _r(g, n).abs() + 0.5, _r(g, n)
    pos = _r(g, 1, p, n) if p else None
    bad = torch.zeros(b, L, dtype=torch.bool)
    bad[0, L - 1] = True

    def check(got, want, name):
        for gt, wt in zip(got, want):
            gt = gt.double().cpu()
            assert gt[bad].isnan().all() and torch.isfinite(gt[~bad]).all(), name
            torch.testing.assert_close(gt[~bad], wt[~bad], rtol=2e-5, atol=2e-5, msg=name)

    check((dk.linear_gelu(_strided(_dev(x)), _wt(_dev(w1)), _dev(b1), backend="triton"),),
          (_gelu64(F.linear(x, w1, b1)),), "linear_gelu")
    check(dk.linear_add_norm(_strided(_dev(x)), _dev(wl), _dev(bl), _dev(res), _dev(lw), _dev(lb), 1e-5, _dev(pos),
                             backend="triton"),
          dk.linear_add_norm_reference(x, wl, bl, res, lw, lb, 1e-5, pos), "linear_add_norm")
    check(dk.fused_mlp_add_norm(_dev(x), _wt(_dev(w1)), _dev(b1), _dev(w2), _dev(b2), _dev(res), _dev(lw), _dev(lb),
                                1e-5, _dev(pos), backend="triton"),
          dk.fused_mlp_add_norm_reference(x, w1, b1, w2, b2, res, lw, lb, 1e-5, pos), "fused_mlp_add_norm")
