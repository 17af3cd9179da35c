"""regression_head (LayerNorm -> Linear(D, 5) -> sigmoid / identity / softplus in one kernel): the
Triton kernel (CPU interpreter, or the GPU) against an independent float64 formula, strides,
dtypes, activation extremes, poisoned outputs, errors, registration, and the student's head."""
from __future__ import annotations

import math

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heads

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _params(d, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    lw, lb = torch.randn(d, generator=g) * 0.5 + 1, torch.randn(d, generator=g) * 0.3
    fw, fb = torch.randn(5, d, generator=g) * (3.0 / d ** 0.5), torch.randn(5, generator=g) * 2
    return [t.to(device) for t in (lw, lb, fw, fb)]


def _float64(x, lw, lb, fw, fb, eps=1e-5):
    """Independent formula in float64: LayerNorm, the 5 dot products, the activations."""
    x = x.double().cpu()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps) * lw.double().cpu() + lb.double().cpu()
    y = h @ fw.double().cpu().T + fb.double().cpu()
    sp = torch.where(y > 20, y, torch.log1p(torch.exp(torch.clamp(y, max=20))))
    sg = 1 / (1 + torch.exp(-y))
    return torch.cat((sg[..., :2], y[..., 2:3], sp[..., 3:]), -1)


@pytest.mark.parametrize("shape,d,strided", [((2, 17), 192, True), ((1, 17), 192, False), ((3, 133), 100, False),
                                             ((37,), 24, True)], ids=str)
def test_regression_head_matches_float64(shape, d, strided, monkeypatch):
    from distilpose_kernels import heads_triton

    monkeypatch.setattr(heads_triton, "_new_output", lambda s, device, dtype: torch.full(
        s, float("nan"), device=device, dtype=dtype))
    g = torch.Generator().manual_seed(d)
    if strided and len(shape) > 1:  # the keypoint tokens: a slice of the (N, K + P, D) stream
        x = (torch.randn(*shape[:-1], shape[-1] + 9, d, generator=g) * 2 + 0.5).to(DEV)[..., 3:3 + shape[-1], :]
        assert not x.is_contiguous()
    elif strided:  # a column stride (every other channel)
        x = (torch.randn(*shape, 2 * d, generator=g) * 2 + 0.5).to(DEV)[..., ::2]
        assert x.stride(-1) == 2
    else:
        x = (torch.randn(*shape, d, generator=g) * 2 + 0.5).to(DEV)
    p = _params(d, seed=d)
    got = dk.regression_head(x, *p, backend="triton")
    assert got.shape == (*shape, 5) and got.dtype == torch.float32 and not got.isnan().any()
    want = _float64(x, *p)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dk.regression_head_reference(x, *p).double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_regression_head_activation_extremes_and_bf16():
    """softplus beyond its threshold (20) and far below 0 (log1p(exp(y)) ~ exp(y), no 0 from
    1 + tiny), sigmoid at +-40; bf16 tokens and parameters (fp32 math)."""
    d = 32
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1)).to(DEV)
    lw, lb, fw, fb = _params(d, seed=2)
    fw = fw * 0  # outputs = the bias: each activation at chosen points
    for bias in ([40.0, -40.0, 3.0, 25.0, -30.0], [0.0, 1e-3, -7.5, 19.9, -0.5]):
        fb = torch.tensor(bias, device=DEV)
        got = dk.regression_head(x, lw, lb, fw, fb, backend="triton")
        want = _float64(x, lw, lb, fw, fb)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-30)
    assert float(got[0, 4]) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    xb, pb = x.bfloat16(), [t.bfloat16() for t in (lw, lb, _params(d, 3)[2], fb)]
    got = dk.regression_head(xb, *pb, backend="triton")
    want = _float64(xb, *pb)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


def test_regression_head_nan_token_stays_in_its_row():
    x = torch.randn(3, 17, 48).to(DEV)
    x[1, 4, 7] = float("nan")
    got = dk.regression_head(x, *_params(48), backend="triton")
    assert got[1, 4].isnan().all() and not got[1, :4].isnan().any() and not got[0].isnan().any()


def test_regression_head_errors_name_the_argument():
    x, p = torch.randn(2, 17, 32), _params(32, device="cpu")
    cases = [
        (dict(tokens=torch.ones(2, 17, 32, dtype=torch.long)), TypeError, "tokens: expected a floating-point"),
        (dict(norm_weight=p[0][:5]), ValueError, "norm_weight: expected shape"),
        (dict(fc_weight=torch.randn(4, 32)), ValueError, r"fc_weight: expected shape \(5, 32\)"),
        (dict(fc_bias=torch.randn(6)), ValueError, "fc_bias: expected shape"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(backend="fast"), ValueError, "backend"),
    ]
    base = dict(tokens=x, norm_weight=p[0], norm_bias=p[1], fc_weight=p[2], fc_bias=p[3])
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.regression_head(**{**base, **change})


def test_regression_head_autograd_takes_the_reference_and_opcheck():
    x = torch.randn(2, 17, 32, requires_grad=True)
    p = _params(32, device="cpu")
    out = dk.regression_head(x, *p, backend="triton")
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.library.opcheck(heads._op, (torch.randn(2, 5, 32), *p, 1e-5))


def test_student_head_fused_matches_and_the_engine_fuses_it():
    from distilpose.models import build_model
    from distilpose.models.heads import RegressionHead
    from distilpose.runtime import InferenceEngine

    m = build_model("distilpose_tiny").eval()
    tokens = torch.randn(2, 17, m.tde.dim)
    head = next(mod for mod in m.modules() if isinstance(mod, RegressionHead))
    with torch.no_grad():
        ref = head(tokens)
        head.fused = True
        got = head(tokens)
        head.fused = False
    for k in ("coords", "score", "sigma"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    eng = InferenceEngine(m)
    assert all(mod.fused for mod in eng.model.modules() if isinstance(mod, RegressionHead))
    assert not head.fused  # the engine works on its own copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_regression_head_default_is_the_kernel():
    x = torch.randn(2, 290, 192, device="cuda")[:, :17]
    p = _params(192, device="cuda")
    got = dk.regression_head(x, *p)
    torch.testing.assert_close(got.double().cpu(), _float64(x, *p), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_regression_head_kernel_compiles_for_sm90_without_a_gpu():
    from sm90 import compile_for_sm90

    compile_for_sm90(r"""
import distilpose_kernels.heads_triton as ht
for p in ("*fp32", "*bf16", "*fp16"):
    compile_(ht._regression_head_kernel, dict(X=p, LNW=p, LNB=p, FW=p, FB=p, Y="*fp32"), dict(eps="fp32"),
             dict(BLOCK_R=ht.BLOCK_R, BLOCK_D=256), num_warps=4)
""")
