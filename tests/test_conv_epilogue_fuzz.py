"""Adversarial checks of the fused-epilogue ops: ``conv2d_relu`` (conv + bias [+ residual] + ReLU)
and ``upsample_sum`` (HRNet's multi-resolution sum; the Triton kernel under TRITON_INTERPRET=1
on CPU): random shapes and layouts against float64, strided parameters, non-finite values,
output dtype and layout on every path, and the custom ops' fake kernels."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import distilpose_kernels as dk
from distilpose_kernels import conv_epilogue as ce  # noqa: F401 - registers distilpose::conv2d_relu
from distilpose_kernels import multiscale as ms

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ============================================================================ conv2d_relu


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another layout: "cl" channels-last, "view" a non-contiguous view."""
    if how == "cl" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if how == "view":
        big = torch.zeros(t.shape[0] * 2, *t.shape[1:], dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    return t


def _conv_case(rng: random.Random):
    groups = rng.choice([1, 1, 2, 3])
    cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3])
    stride, dil = (rng.randint(1, 2), rng.randint(1, 2)), (rng.randint(1, 2), rng.randint(1, 2))
    pad = (rng.randint(0, 2), rng.randint(0, 2))
    h = rng.randint(dil[0] * (kh - 1) + 1, 9)
    w = rng.randint(dil[1] * (kw - 1) + 1, 9)
    return rng.randint(1, 2), cin, h, w, cout, (kh, kw), stride, pad, dil, groups


@pytest.mark.parametrize("seed", range(6))
def test_conv2d_relu_fuzz_layouts_match_float64(seed):
    """Odd shapes; x, weight, bias and residual each contiguous, channels-last or a strided view;
    the output: x's dtype, channels-last exactly when x or weight is (the docstring's rule)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        n, cin, h, w, cout, (kh, kw), st, pad, dil, groups = _conv_case(rng)
        x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
        wt = torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=torch.float64)
        b = torch.randn(cout, generator=g, dtype=torch.float64) if rng.random() < 0.7 else None
        out64 = F.conv2d(x, wt, b, st, pad, dil, groups)
        r = torch.randn(out64.shape, generator=g, dtype=torch.float64) if rng.random() < 0.6 else None
        want = torch.relu(out64 if r is None else out64 + r)
        lay = [rng.choice(["c", "cl", "view"]) for _ in range(4)]
        args = [_strided(t.float(), how) if t is not None else None for t, how in zip((x, wt, b, r), lay)]
        cl = any(ce._channels_last(t) for t in args[:2])
        for backend in (None, "reference"):
            got = dk.conv2d_relu(*args, stride=st, padding=pad, dilation=dil, groups=groups, backend=backend)
            assert got.dtype == torch.float32 and got.shape == want.shape
            fmt = torch.channels_last if cl else torch.contiguous_format
            assert got.is_contiguous(memory_format=fmt), (lay, got.stride())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        op = torch.ops.distilpose.conv2d_relu(*args, list(st), list(pad), list(dil), groups, "reference")
        torch.testing.assert_close(op.double(), want, rtol=1e-5, atol=1e-5)


def test_conv2d_relu_reference_dtype_does_not_depend_on_grad_mode():
    """The public reference with a float64 residual after a float32 conv: ``conv + residual``
    promotes to float64 with autograd; without it the add ran in place into the float32 conv
    output (and a broadcasting residual raised). Same result either way."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    r64 = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    rb = torch.randn(2, 3, 3, 3)  # broadcasts the batch
    for r in (r64, rb):
        tracked = dk.conv2d_relu_reference(x, w.clone().requires_grad_(), None, r)
        with torch.no_grad():
            plain = dk.conv2d_relu_reference(x, w, None, r)
        assert plain.dtype == tracked.dtype and plain.shape == tracked.shape
        torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)


def test_conv2d_relu_autocast_leaves_float64_like_conv2d():
    """Autocast casts float16/32 inputs, not float64 ones (as for F.conv2d)."""
    x, w, b = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64), None
    r = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.conv2d(x, w, b)
        got = dk.conv2d_relu(x, w, b, r)
        assert dk.conv2d_relu(x.float(), w.float(), b, r.float()).dtype == torch.bfloat16
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, torch.relu(want + r), rtol=0, atol=0)


def test_conv2d_relu_nonfinite_values_follow_the_reference():
    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    r = torch.randn(1, 3, 3, 3)
    r[0, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    x2 = x.clone()
    x2[0, 1, 4, 4] = float("nan")
    for xi in (x, x2):
        got = dk.conv2d_relu(xi, w, b, r)
        want = torch.relu(F.conv2d(xi.double(), w.double(), b.double()) + r.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[0, 0, 0, 0] == float("inf") and got[0, 0, 0, 1] == 0 and got[0, 0, 0, 2].isnan()


# ============================================================================ upsample_sum

_FAKE = FakeTensorMode()


def _fake_strides(base, terms, scales):
    with _FAKE:
        fb, ft = _FAKE.from_tensor(base), [_FAKE.from_tensor(t) for t in terms]
        return torch.ops.distilpose.upsample_sum(fb, ft, scales, True).stride()


def _cnhw(t):  # dense, but neither contiguous nor channels-last
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _sliced_cl(t):  # channels-last order, not dense
    big = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype).contiguous(
        memory_format=torch.channels_last)
    big[:, ::2] = t
    return big[:, ::2]


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("layout", ["cnhw", "sliced_cl"])
def test_upsample_sum_op_layout_matches_its_fake_kernel(layout):
    """A base in neither layout takes the op's reference fallback; its output must still have the
    strides the fake kernel promises (Inductor asserts them: 'expected ... stride')."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 4, 8, generator=g)
    base = _cnhw(base) if layout == "cnhw" else _sliced_cl(base)
    terms, scales = [torch.randn(2, 6, 2, 4, generator=g)], [2]
    real = torch.ops.distilpose.upsample_sum(base.to(DEV), [t.to(DEV) for t in terms], scales, True)
    assert real.stride() == _fake_strides(base, terms, scales)
    torch.testing.assert_close(real.cpu(), ms.upsample_sum_reference(base, terms, scales), rtol=0, atol=0)
    # float64 (no kernel): the reference inside the op, same layout rule
    b64, t64 = base.double(), [t.double() for t in terms]
    assert torch.ops.distilpose.upsample_sum(b64, t64, scales, True).stride() == _fake_strides(b64, t64, scales)


def _lcm(values):
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("seed", range(4))
def test_upsample_sum_fuzz_matches_float64(seed):
    """Random sizes, 0-4 terms with scales 1-4, every dtype, base and terms in any layout
    (contiguous, channels-last, non-dense, CNHW, expanded), +-inf and NaN: the kernel (or its
    fallback) equals the float64 sum of the same rounded inputs, in base's dtype."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lays = {"c": lambda t: t, "cl": lambda t: t.contiguous(memory_format=torch.channels_last),
            "view": _sliced_cl, "cnhw": _cnhw}
    for _ in range(8):
        n, c = rng.randint(1, 2), rng.choice([1, 2, 3, 5, 17])
        scales = [rng.randint(1, 4) for _ in range(rng.randint(0, 4))]
        h, w = _lcm(scales) * rng.randint(1, 3), _lcm(scales) * rng.randint(1, 3)
        dt = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        base = (torch.randn(n, c, h, w, generator=g) * 3).to(dt)
        terms = [torch.randn(n, c, h // s, w // s, generator=g).to(dt) for s in scales]
        if terms and rng.random() < 0.3:
            terms[0] = terms[0][:, :, :1, :1].expand(terms[0].shape)  # stride-0 term
        specials = [float("inf"), -float("inf"), float("nan")]
        base.view(-1)[rng.randrange(base.numel())] = rng.choice(specials)
        if terms:
            t = terms[-1].clone()
            t.view(-1)[rng.randrange(t.numel())] = rng.choice(specials)
            terms[-1] = t
        relu = rng.random() < 0.7
        want = ms.upsample_sum_reference(base.double(), [t.double() for t in terms], scales, relu)
        b = lays[rng.choice(list(lays))](base).to(DEV)
        ts = [lays[rng.choice(list(lays))](t).to(DEV) if t.stride()[-1] else t.to(DEV) for t in terms]
        got = dk.upsample_sum(b, ts, scales, relu=relu, backend="triton")
        assert got.dtype == dt and got.shape == want.shape
        tol = 1e-5 if dt == torch.float32 else 2e-2
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol, equal_nan=True)
        cl = ce._channels_last(b)
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
