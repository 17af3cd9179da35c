"""linear_gelu (the TDE MLP's fc1 + bias + exact GELU in one kernel): Triton kernel (CPU
interpreter, or the GPU) vs float64, gradients, registration, the "auto" choice, errors, and the
fused TDE MLP."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from sm90 import compile_for_sm90
from distilpose_kernels import mlp as mlp_mod

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_tile(monkeypatch):
    if DEV == "cpu":  # the interpreter is slow: small tiles, several of them per output
        from distilpose_kernels import mlp_triton

        monkeypatch.setattr(mlp_triton, "TILE_OVERRIDE", mlp_triton.GemmTile(16, 16, 16, 4, 1))


def _inputs(shape, k, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=DEV, dtype=dtype)  # noqa: E731
    return (cast(x), cast(w), cast(b)), (x.to(DEV), w.to(DEV), None if b is None else b.to(DEV))


CASES = [((37,), 24, 40), ((2, 9), 48, 33), ((1,), 7, 3), ((3, 17), 32, 96)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_linear_gelu_matches_float64(case, bias, monkeypatch):
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    shape, k, n = case
    (x, w, b), (x64, w64, b64) = _inputs(shape, k, n, bias=bias, seed=k + n)
    got = dk.linear_gelu(x, w, b, backend="triton")
    want = F.gelu(F.linear(x64, w64, b64))
    assert got.shape == (*shape, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gelu_low_precision(dtype):
    (x, w, b), (x64, w64, b64) = _inputs((2, 19), 64, 72, dtype=dtype, seed=4)
    got = dk.linear_gelu(x, w, b, backend="triton")
    want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_linear_gelu_strided_input():
    (x, w, b), _ = _inputs((8, 5), 24, 16, seed=6)
    xt = x.transpose(0, 1)  # (5, 8, 24) non-contiguous
    torch.testing.assert_close(dk.linear_gelu(xt, w, b, backend="triton"), F.gelu(F.linear(xt, w, b)),
                               rtol=1e-5, atol=1e-5)


def test_linear_gelu_gradients_and_registration():
    (x, w, b), _ = _inputs((3, 11), 24, 40, seed=8)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    refs = [t.clone().requires_grad_() for t in (x, w, b)]
    out = dk.linear_gelu(*leaves, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    F.gelu(F.linear(*refs)).backward(g)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: torch.ops.distilpose.linear_gelu(*t, "reference"), (x64, w64, b64),
                                    eps=1e-6, atol=1e-5)
    torch.library.opcheck(torch.ops.distilpose.linear_gelu.default, (x.clone().requires_grad_(), w, b, "triton"))
    torch.library.opcheck(torch.ops.distilpose.linear_gelu.default, (x, w, None, "reference"))
    f = torch.compile(lambda a: dk.linear_gelu(a, w, b, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), 2 * F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


def test_linear_gelu_autocast_and_errors():
    (x, w, b), _ = _inputs((4,), 16, 8, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dk.linear_gelu(x.cpu(), w.cpu(), b.cpu())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.gelu(F.linear(x.cpu().bfloat16(), w.cpu().bfloat16(), b.cpu().bfloat16())))
    cases = [
        (dict(weight=w[:, :3]), ValueError, "weight: expected shape"),
        (dict(weight=w[0]), ValueError, "weight: expected a 2-D"),
        (dict(bias=b[:3]), ValueError, "bias: expected shape"),
        (dict(weight=w.double()), TypeError, "weight: expected dtype"),
        (dict(bias=b.double()), TypeError, "bias: expected dtype"),
        (dict(x=x.long()), TypeError, "x: expected a floating-point"),
        (dict(backend="cudnn"), ValueError, "backend must be"),
    ]
    base = dict(x=x, weight=w, bias=b)
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.linear_gelu(**{**base, **change})


@pytest.fixture
def tuner(monkeypatch, stub_cuda_timer):
    monkeypatch.setattr(mlp_mod, "_CHOICE", {})
    return stub_cuda_timer, torch.randn(8, 16)


def _named(name, fn):
    fn.__name__ = name
    return fn


def test_auto_choice_times_checks_and_caches(tuner):
    t, good = tuner
    calls = []
    fused = _named("fused", lambda: calls.append("f") or good * (1 + 1e-6))
    ref = _named("reference", lambda: calls.append("r") or good.clone())
    assert mlp_mod._choose(("k",), fused, ref) is True
    n = len(calls)
    assert mlp_mod._choose(("k",), fused, ref) is True and len(calls) == n
    t["fused"] = 5.0
    assert mlp_mod._choose(("k2",), fused, ref) is False
    bad = _named("fused", lambda: good + 1.0)
    with pytest.warns(UserWarning, match="disagrees"):
        assert mlp_mod._choose(("k3",), bad, ref) is False
    boom = _named("fused", lambda: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.warns(UserWarning, match="failed"):
        assert mlp_mod._choose(("k4",), boom, ref) is False
    nan = good.clone()
    nan[0, 0] = float("nan")
    assert mlp_mod._choose(("k5",), fused, _named("reference", lambda: nan)) is False and ("k5",) not in mlp_mod._CHOICE


def test_tde_mlp_fused_gelu_keeps_the_outputs():
    from distilpose.models.tde import Mlp

    torch.manual_seed(0)
    m = Mlp(24, 40).to(DEV)
    x = torch.randn(2, 9, 24, device=DEV, requires_grad=True)
    a = m(x)
    ga = torch.autograd.grad(a.square().sum(), (x, m.fc1.weight))
    m.fuse_gelu = True
    b = m(x)
    gb = torch.autograd.grad(b.square().sum(), (x, m.fc1.weight))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


_AOT = r"""
import distilpose_kernels.mlp_triton as mt

t = mt.DEFAULT_TILE
for p, prec in (("*bf16", "tf32"), ("*fp32", "ieee")):
    consts = dict(HAS_B=True, GELU=True, PRECISION=prec, UPCAST=False, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                  BLOCK_K=t.block_k, GROUP_M=8)
    compile_(mt._linear_gelu_kernel, dict(X=p, Wt=p, B=p, Y=p), {}, consts, num_warps=t.num_warps,
             num_stages=t.num_stages)
"""


@pytest.mark.slow
def test_linear_gelu_kernel_compiles_for_sm90_without_a_gpu():
    compile_for_sm90(_AOT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_linear_gelu_tde_shape_and_auto(dtype):
    """The TDE's fc1 at batch 64 (17,472 tokens): the kernel, and "auto", against float64."""
    (x, w, b), (x64, w64, b64) = _inputs((64, 273), 192, 576, dtype=dtype, seed=1)
    want = F.gelu(F.linear(x64, w64, b64))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # fp32 with TF32 if the user allowed it
    for backend in ("triton", None):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="linear_gelu")
            got = dk.linear_gelu(x, w, b, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_triton_ops_reject_unsupported_dtypes_the_same_way():
    """The shared dtype rule of select_triton_backend: backend="triton" names the argument and
    the dtype; "auto" falls back to the reference (float64 here)."""
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=DEV)
    w = torch.randn(4, 8, dtype=torch.float64, device=DEV)
    base = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEV)
    calls = [
        ("x", lambda be: dk.add_pos_layernorm(x, None, backend=be)[1], lambda: F.layer_norm(x, (8,))),
        ("x", lambda be: dk.linear_gelu(x, w, backend=be), lambda: F.gelu(F.linear(x, w))),
        ("base", lambda be: dk.upsample_sum(base, [], [], backend=be), lambda: torch.relu(base)),
    ]
    for name, op, want in calls:
        with pytest.raises(TypeError, match=f"{name}: backend='triton' does not support dtype torch.float64"):
            op("triton")
        got = op(None)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want())
