"""upsample_sum (HRNet's multi-resolution sum + ReLU in one pass): the Triton kernel (CPU
interpreter, or the GPU) against a float64 reference, gradients, registration, errors, and the
fused HRModule."""
from __future__ import annotations


import pytest
import torch

import distilpose_kernels as dk
from sm90 import compile_for_sm90
from distilpose_kernels import multiscale as ms

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tri():
    from distilpose_kernels import multiscale_triton

    return multiscale_triton


def _inputs(n, c, h, w, scales, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    terms = [torch.randn(n, c, h // s, w // s, generator=g, dtype=torch.float64) for s in scales]
    cast = lambda t: t.to(device=DEV, dtype=dtype)  # noqa: E731
    b, ts = cast(base), [cast(t) for t in terms]
    if channels_last:
        b = b.contiguous(memory_format=torch.channels_last)
        ts = [t.contiguous(memory_format=torch.channels_last) if k % 2 == 0 else t for k, t in enumerate(ts)]
    return b, ts, base.to(DEV), [t.to(DEV) for t in terms]


CASES = [  # (n, c, h, w, scales): HRNet rows (x2, x4, x8 up; full-size downsampled terms), odd sizes
    (2, 5, 8, 12, [2]),
    (1, 3, 16, 8, [2, 4, 8]),
    (2, 7, 12, 12, [1, 2]),
    (3, 4, 4, 6, [1, 1, 2, 2]),   # four terms: two kernel passes
    (1, 48, 16, 24, [2, 4, 8]),
    (2, 6, 6, 9, []),             # no term: relu(base)
    (1, 3, 4, 520, [2, 4]),       # NCHW: several tiles along W (masked tail)
    (1, 300, 4, 6, [2]),          # channels-last: several tiles along C (masked tail)
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_upsample_sum_matches_float64(case, channels_last, relu, monkeypatch):
    monkeypatch.setattr(_tri(), "_empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))  # poisoned
    n, c, h, w, scales = case
    b, ts, b64, t64 = _inputs(n, c, h, w, scales, channels_last=channels_last, seed=h + w)
    got = dk.upsample_sum(b, ts, scales, relu=relu, backend="triton")
    want = ms.upsample_sum_reference(b64, t64, scales, relu=relu)
    assert got.dtype == torch.float32 and got.shape == (n, c, h, w)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if relu:
        assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upsample_sum_low_precision(dtype):
    b, ts, b64, t64 = _inputs(2, 6, 8, 12, [2, 4], dtype=dtype, seed=3)
    got = dk.upsample_sum(b, ts, [2, 4], backend="triton")
    want = ms.upsample_sum_reference(*[t.double() for t in (b,)], [t.double() for t in ts], [2, 4])
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)  # one rounding of an fp32 sum


def test_upsample_sum_strided_terms_and_nan():
    b, ts, b64, t64 = _inputs(2, 4, 8, 8, [2], seed=5)
    big = torch.randn(2, 8, 4, 4, device=DEV)
    term = big[:, ::2]  # non-contiguous
    got = dk.upsample_sum(b, [term], [2], backend="triton")
    torch.testing.assert_close(got, ms.upsample_sum_reference(b, [term.contiguous()], [2]))
    b2 = b.clone()
    b2[1, 2, 3, 3] = float("nan")
    out = dk.upsample_sum(b2, [term], [2], backend="triton")
    assert out[1, 2, 3, 3].isnan() and out.isnan().sum() == 1


def test_upsample_sum_gradients_and_registration():
    b, ts, _, _ = _inputs(2, 3, 8, 12, [2, 1, 4], seed=7)
    leaves = [t.clone().requires_grad_() for t in (b, *ts)]
    refs = [t.clone().requires_grad_() for t in (b, *ts)]
    out = dk.upsample_sum(leaves[0], leaves[1:], [2, 1, 4], backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ms.upsample_sum_reference(refs[0], refs[1:], [2, 1, 4]).backward(g)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
    # float64 gradcheck through the custom op (its reference path) and opcheck
    b64 = b.double().requires_grad_()
    t64 = [t.double().requires_grad_() for t in ts]
    assert torch.autograd.gradcheck(lambda x, *tt: torch.ops.distilpose.upsample_sum(x, list(tt), [2, 1, 4], True),
                                    (b64, *t64), eps=1e-6, atol=1e-5)
    torch.library.opcheck(torch.ops.distilpose.upsample_sum.default, (b.clone().requires_grad_(), list(ts), [2, 1, 4], True))
    f = torch.compile(lambda x, t: dk.upsample_sum(x, t, [2, 1, 4]) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(b, ts), 2 * ms.upsample_sum_reference(b, ts, [2, 1, 4]))


def test_upsample_sum_bad_inputs():
    b, ts, _, _ = _inputs(2, 3, 8, 12, [2], seed=1)
    cases = [
        (dict(base=b[0]), ValueError, "base: expected a 4-D"),
        (dict(terms=ts[0]), TypeError, "terms: expected a list"),
        (dict(scales=[2, 2]), ValueError, "scales: expected a list of 1"),
        (dict(scales=[0]), ValueError, r"scales\[0\]: expected an int >= 1"),
        (dict(scales=[4]), ValueError, r"terms\[0\]: expected shape"),
        (dict(terms=[ts[0][:, :2]]), ValueError, r"terms\[0\]: expected shape"),
        (dict(terms=[ts[0].double()]), TypeError, r"terms\[0\]: expected dtype"),
        (dict(terms=[ts[0].to("meta")]), ValueError, r"terms\[0\]: expected a tensor on"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ]
    base = dict(base=b, terms=ts, scales=[2])
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.upsample_sum(**{**base, **change})


def test_hrmodule_fused_sum_keeps_the_outputs():
    from distilpose.fuse import fuse_conv_bn_model, fuse_conv_epilogues
    from distilpose.models import build_model
    from distilpose.models.backbones.hrnet import HRModule

    model = build_model("tokenpose_tiny").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_mean, -0.5, 0.5)
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
    folded = fuse_conv_bn_model(model)
    fused = fuse_conv_epilogues(folded)
    mods = [m for m in fused.modules() if isinstance(m, HRModule) and m.fuse_layers is not None]
    assert mods and all(m.fused_sum for m in mods)
    assert not any(m.fused_sum for m in fuse_conv_epilogues(model).modules() if isinstance(m, HRModule))  # BNs kept
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        a, b = folded(x), fused(x)
    for k in a:  # the CPU runs the op's reference; the downsample biases are added with the last convs'
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


_AOT = r"""
import distilpose_kernels.multiscale_triton as mt

for p in ("*bf16", "*fp32"):
    for nt, cl, ba, bb in ((1, False, 16, 64), (3, True, 16, 64), (2, True, 4, 256)):
        compile_(mt._upsample_sum_kernel, dict(BASE=p, OUT=p, T0=p, T1=p, T2=p), {},
                 dict(NT=nt, CL=cl, RELU=True, BLOCK_A=ba, BLOCK_B=bb), num_warps=4)
"""


@pytest.mark.slow
def test_upsample_sum_kernel_compiles_for_sm90_without_a_gpu():
    compile_for_sm90(_AOT)


def test_upsample_sum_gradients_edge_cases():
    """No term; only some terms requiring gradients; relu=False (sum pooling of the full grad)."""
    b = torch.randn(1, 2, 4, 4, device=DEV, requires_grad=True)
    dk.upsample_sum(b, [], [], backend="triton").sum().backward()
    torch.testing.assert_close(b.grad, (b > 0).to(b.dtype))
    frozen, trained = torch.randn(1, 2, 2, 2, device=DEV), torch.randn(1, 2, 4, 4, device=DEV, requires_grad=True)
    b.grad = None
    dk.upsample_sum(b, [frozen, trained], [2, 1], backend="triton").sum().backward()
    assert frozen.grad is None and trained.grad is not None and b.grad is not None
    t = torch.randn(1, 2, 2, 2, device=DEV, requires_grad=True)
    dk.upsample_sum(torch.randn(1, 2, 4, 4, device=DEV), [t], [2], relu=False, backend="triton").sum().backward()
    torch.testing.assert_close(t.grad, torch.full_like(t, 4.0))
