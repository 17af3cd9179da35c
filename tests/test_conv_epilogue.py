"""conv2d_relu (conv + bias + residual + ReLU), ConvReLU2d, the "auto" choice, and the model pass
that fuses the epilogues of an inference model (``distilpose.fuse.fuse_conv_epilogues``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import conv_epilogue as ce
from sm90 import compile_for_sm90

# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups)
SHAPES = [
    (1, 3, 13, 9, 5, 3, 2, 1, 1, 1),       # odd sizes, batch 1, stride 2 (the stem's first conv)
    (2, 8, 16, 12, 8, 3, 1, 1, 1, 1),      # 3x3 same-size (a block's middle conv)
    (3, 16, 7, 5, 32, 1, 1, 0, 1, 1),      # 1x1 expansion (a Bottleneck's last conv)
    (2, 6, 11, 10, 9, 3, 1, 2, 2, 3),      # dilation and groups
    (2, 4, 9, 9, 4, (3, 1), (2, 1), (1, 0), 1, 1),  # non-square kernel / stride / padding
]


def _make(shape, dtype=torch.float32, bias=True, residual=True, channels_last=False, seed=0, device="cpu"):
    """(inputs in ``dtype``, the same in float64, conv kwargs); all on ``device``."""
    n, cin, h, w, cout, k, stride, padding, dilation, groups = shape
    g = torch.Generator(device).manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    f64 = dict(generator=g, dtype=torch.float64, device=device)
    x = torch.randn(n, cin, h, w, **f64)
    wt = torch.randn(cout, cin // groups, kh, kw, **f64) / (cin // groups * kh * kw) ** 0.5
    b = torch.randn(cout, **f64) * 0.3 if bias else None
    out64 = F.conv2d(x, wt, b, stride, padding, dilation, groups)
    r = torch.randn(out64.shape, **f64) if residual else None
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = [t.to(dtype) if t is not None else None for t in (x, wt, b, r)]
    if channels_last:
        conv[0] = conv[0].contiguous(memory_format=torch.channels_last)
    return conv, (x, wt, b, r), args


def _expected64(x, wt, b, r, args):
    out = F.conv2d(x, wt, b, args["stride"], args["padding"], args["dilation"], args["groups"])
    return torch.relu(out + r if r is not None else out)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv2d_relu_matches_float64(shape, bias, residual, channels_last):
    (x, w, b, r), ref_in, args = _make(shape, bias=bias, residual=residual, channels_last=channels_last)
    got = dk.conv2d_relu(x, w, b, r, **args)
    want = _expected64(*ref_in, args)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got > 0).any() and (got == 0).any()  # the ReLU actually clipped something, and not everything


def test_custom_op_matches_and_has_the_fake_layout():
    (x, w, b, r), ref_in, args = _make(SHAPES[1], channels_last=True)
    st, pad, dil = ([v, v] for v in (args["stride"], args["padding"], args["dilation"]))
    got = torch.ops.distilpose.conv2d_relu(x, w, b, r, st, pad, dil, args["groups"], "reference")
    torch.testing.assert_close(got.double(), _expected64(*ref_in, args), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=str)
def test_custom_op_gradcheck_float64(shape):
    (x, w, b, r), _, args = _make(shape, dtype=torch.float64)
    st, pad, dil = ([v, v] if isinstance(v, int) else list(v) for v in (args["stride"], args["padding"], args["dilation"]))
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b, r))

    def f(x, w, b, r):
        return torch.ops.distilpose.conv2d_relu(x, w, b, r, st, pad, dil, args["groups"], "reference")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_custom_op_gradients_equal_the_reference_autograd(bias, residual):
    (x, w, b, r), _, args = _make(SHAPES[2], bias=bias, residual=residual)
    st, pad, dil = ([v, v] for v in (args["stride"], args["padding"], args["dilation"]))
    leaves = [t for t in (x, w, b, r) if t is not None]
    a = [t.clone().requires_grad_(True) for t in leaves]
    c = [t.clone().requires_grad_(True) for t in leaves]

    def fill(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, w, b, r)]

    gout = torch.randn(_expected64(*[t.double() if t is not None else None for t in (x, w, b, r)], args).shape)
    torch.ops.distilpose.conv2d_relu(*fill(a), st, pad, dil, args["groups"], "reference").backward(gout)
    dk.conv2d_relu_reference(*fill(c), **args).backward(gout)
    for ga, gc in zip(a, c):
        torch.testing.assert_close(ga.grad, gc.grad, rtol=1e-5, atol=1e-6)


def test_public_op_tracks_gradients_on_the_reference_path():
    (x, w, b, r), _, args = _make(SHAPES[1])
    w.requires_grad_(True)
    dk.conv2d_relu(x, w, b, r, **args).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_opcheck(bias, residual, channels_last):
    (x, w, b, r), _, args = _make(SHAPES[1], bias=bias, residual=residual, channels_last=channels_last)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.distilpose.conv2d_relu.default, (x, w, b, r, [1, 1], [1, 1], [1, 1], 1, "reference"))


def test_compiles_without_graph_break():
    (x, w, b, r), ref_in, args = _make(SHAPES[1])

    def f(x, w, b, r):
        return torch.ops.distilpose.conv2d_relu(x, w, b, r, [1, 1], [1, 1], [1, 1], 1, "auto") * 2.0

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b, r)
    torch.testing.assert_close(got.double(), 2.0 * _expected64(*ref_in, args), rtol=1e-5, atol=1e-5)


def test_autocast_casts_every_input_like_conv2d():
    (x, w, b, r), _, args = _make(SHAPES[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dk.conv2d_relu(x, w, b, r, **args)
    want = dk.conv2d_relu_reference(*(t.bfloat16() for t in (x, w, b, r)), **args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_nan_propagates_on_the_reference_path():
    (x, w, b, r), _, args = _make(SHAPES[2])
    x[0, :, 3, 2] = float("nan")
    got = dk.conv2d_relu(x, w, b, r, **args)
    assert got[0, :, 3, 2].isnan().all() and not got[1:].isnan().any()


# ----------------------------------------------------------------------------- the Triton kernel (short reductions)

# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups): reductions Cin x kh x kw <= 64
TRITON_SHAPES = [
    (2, 3, 17, 13, 24, 3, 2, 1, 1, 1),  # the RGB stem: 27-long reduction, stride 2, odd sizes
    (1, 3, 9, 11, 8, 3, 1, 1, 1, 1),  # batch 1, stride 1
    (2, 4, 8, 8, 20, 1, 1, 0, 1, 1),  # 1x1, Cout not a multiple of the tile
    (1, 2, 7, 9, 5, (5, 3), (2, 1), (2, 1), (1, 2), 1),  # non-square kernel / stride / padding, dilation
    (1, 7, 6, 6, 3, 3, 1, 1, 1, 1),  # a 63-long reduction: 4 blocks of 16, the last masked
]


@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_small_reduction_conv_matches_float64(shape, bias, channels_last, monkeypatch):
    """backend="triton" (implicit GEMM over Cin x kh x kw) against float64, into NaN-filled
    outputs, in the layout the reference gives; small tiles so several programs cover pixels and
    output channels."""
    from distilpose_kernels import conv_epilogue_triton as ct

    monkeypatch.setattr(ct, "TILE_OVERRIDE", (32, 16, 4))
    monkeypatch.setattr(ct, "_new_output", lambda shape, device, dtype, memory_format: torch.full(
        shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=memory_format))
    (x, w, b, _), (x64, w64, b64, _), args = _make(shape, bias=bias, residual=False, channels_last=channels_last)
    got = dk.conv2d_relu(x, w, b, **args, backend="triton")
    want = _expected64(x64, w64, b64, None, args)
    ref = dk.conv2d_relu(x, w, b, **args, backend="reference")
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.stride() == ref.stride()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups): reductions over several BLOCK_K blocks
TRITON_LONG_SHAPES = [
    (2, 17, 9, 7, 24, 3, 1, 1, 1, 1),  # 153 = 2 x 64 + 25: a masked last block, Bottleneck-like 3x3
    (1, 72, 6, 5, 40, 1, 1, 0, 1, 1),  # 1x1, 72-long (a Bottleneck's 256 -> 64 in small)
    (1, 20, 8, 6, 16, 3, 2, 1, 1, 1),  # 180-long, stride 2
]


@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", TRITON_LONG_SHAPES, ids=str)
def test_triton_conv_long_reduction_and_residual_match_float64(shape, residual, channels_last, monkeypatch):
    """The block convs' form: reductions over several BLOCK_K blocks (masked tails), the residual
    added before the ReLU (any layout), into NaN-filled outputs; float64 reference."""
    from distilpose_kernels import conv_epilogue_triton as ct

    monkeypatch.setattr(ct, "TILE_OVERRIDE", (32, 16, 4))
    monkeypatch.setattr(ct, "_new_output", lambda shape, device, dtype, memory_format: torch.full(
        shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=memory_format))
    (x, w, b, r), (x64, w64, b64, r64), args = _make(shape, bias=True, residual=residual,
                                                     channels_last=channels_last)
    got = dk.conv2d_relu(x, w, b, r, **args, backend="triton")
    want = _expected64(x64, w64, b64, r64, args)
    ref = dk.conv2d_relu(x, w, b, r, **args, backend="reference")
    assert got.stride() == ref.stride() and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()  # the ReLU clips some outputs and keeps others


@pytest.mark.interpreter
def test_triton_small_reduction_conv_low_precision_nan_and_gradients(monkeypatch):
    """bf16 within twice the bf16 reference's error of float64; a NaN input pixel gives NaN in
    the outputs that read it (the reference's ReLU propagates it) and nowhere else; with autograd
    the op's backward gives the reference's gradients."""
    from distilpose_kernels import conv_epilogue_triton as ct

    monkeypatch.setattr(ct, "TILE_OVERRIDE", (32, 16, 4))
    (x, w, b, _), (x64, w64, b64, _), args = _make(TRITON_SHAPES[0], residual=False, channels_last=True)
    want = _expected64(x64, w64, b64, None, args)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    got = dk.conv2d_relu(xb, wb, bb, **args, backend="triton")
    ref = dk.conv2d_relu(xb, wb, bb, **args, backend="reference")
    err, err_ref = (float((t.double() - want).abs().max()) for t in (got, ref))
    assert got.dtype == torch.bfloat16 and err <= max(2 * err_ref, 1e-2), (err, err_ref)
    xn = x.clone()
    xn[1, 0, 5, 6] = float("nan")
    got_n = dk.conv2d_relu(xn, w, b, **args, backend="triton")
    ref_n = dk.conv2d_relu(xn, w, b, **args, backend="reference")
    assert torch.equal(got_n.isnan(), ref_n.isnan()) and got_n.isnan().any()
    torch.testing.assert_close(got_n.nan_to_num(0.0), ref_n.nan_to_num(0.0), rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    refs = [t.clone().requires_grad_() for t in (x, w, b)]
    g = torch.randn(want.shape)
    dk.conv2d_relu(*leaves, **args, backend="triton").backward(g)
    dk.conv2d_relu_reference(*refs, **args).backward(g)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_have_clear_errors():
    (x, w, b, r), _, args = _make(SHAPES[1])
    cases = [
        (dict(x=x[0]), ValueError, "x: expected a 4-D"),
        (dict(weight=w[:, :3]), ValueError, "weight: expected shape"),
        (dict(bias=b[:3]), ValueError, "bias: expected shape"),
        (dict(residual=r[:, :, :3]), ValueError, "residual: expected the output's shape"),
        (dict(weight=w.double()), TypeError, "weight: expected dtype torch.float32"),
        (dict(residual=r.to("meta")), ValueError, "residual: expected a tensor on cpu"),
        (dict(x=x.long()), TypeError, "x: expected a floating-point"),
        (dict(stride=0), ValueError, "stride: expected values >= 1"),
        (dict(padding=(1, -1)), ValueError, "padding: expected values >= 0"),
        (dict(dilation=True), TypeError, "dilation: expected an int or a pair"),
        (dict(stride=(1, 2, 3)), TypeError, "stride: expected an int or a pair"),
        (dict(groups=0), ValueError, "groups: expected an int >= 1"),
        (dict(groups=3), ValueError, "weight: expected shape"),
        (dict(x=x[:, :, :1, :1], padding=0), ValueError, "x: spatial size"),
        (dict(backend="fast"), ValueError, "backend: expected"),
        (dict(backend="triton", residual=None, groups=2, weight=w[:, :4]), ValueError,
         "backend='triton' does not take grouped convolutions"),
        (dict(backend="triton", residual=None, x=torch.randn(1, 260, 4, 4), weight=torch.randn(8, 260, 3, 3)),
         ValueError, r"backend='triton' does not take a reduction Cin\*kh\*kw = 2340 > 2304"),
        (dict(backend="cudnn"), RuntimeError, "backend='cudnn' needs CUDA tensors"),
    ]
    base = dict(x=x, weight=w, bias=b, residual=r, **args)
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.conv2d_relu(**{**base, **change})


# ----------------------------------------------------------------------------- the "auto" choice


@pytest.fixture
def tuner(monkeypatch, stub_cuda_timer):
    """_choose with a stub timer: times come from ``t`` ({"fused": ms, "reference": ms})."""
    monkeypatch.setattr(ce, "_CHOICE", {})
    t = stub_cuda_timer
    calls = {"fused": 0, "reference": 0}
    (x, w, b, r), _, args = _make(SHAPES[1])
    good = dk.conv2d_relu_reference(x, w, b, r, **args)

    def make(out_fused):
        def fused():
            calls["fused"] += 1
            if isinstance(out_fused, Exception):
                raise out_fused
            return out_fused

        def reference():
            calls["reference"] += 1
            return good.clone()

        return fused, reference

    return t, calls, good, make


def test_auto_picks_the_fused_op_when_faster_and_equal_and_caches(tuner):
    t, calls, good, make = tuner
    fused, reference = make(good * (1 + 1e-7))
    assert ce._choose(("k",), fused, reference) is True
    n = dict(calls)
    assert ce._choose(("k",), fused, reference) is True
    assert calls == n  # cached: nothing ran again
    t["fused"] = 3.0
    assert ce._choose(("k2",), fused, reference) is False  # slower: the reference


@pytest.mark.parametrize("bad", ["no_bias", "no_relu", "raises"])
def test_auto_rejects_a_wrong_or_failing_fused_op(tuner, bad):
    _, _, good, make = tuner
    wrong = {"no_bias": good + 0.3, "no_relu": good - good.abs().max(), "raises": RuntimeError("no engine")}[bad]
    fused, reference = make(wrong)
    with pytest.warns(UserWarning, match="conv2d_relu: the fused cuDNN op"):
        assert ce._choose(("k",), fused, reference) is False
    assert ce._CHOICE[("k",)] is False


def test_auto_decides_nothing_on_nonfinite_data_or_in_a_capture(tuner, monkeypatch):
    _, calls, good, make = tuner
    fused, _ = make(good)
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert ce._choose(("k",), fused, lambda: bad) is False and ("k",) not in ce._CHOICE
    assert calls["fused"] == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert ce._choose(("k",), *make(good)) is False and ("k",) not in ce._CHOICE


@pytest.mark.interpreter
@pytest.mark.parametrize("triton_ms,cudnn_ok,want", [(0.5, True, "triton"), (3.0, True, "cudnn"),
                                                    (0.5, False, "triton"), (3.0, False, "reference")])
def test_auto_times_the_triton_kernel_against_the_first_choice(stub_cuda_timer, monkeypatch, triton_ms, cudnn_ok,
                                                                want):
    """"auto" on CUDA (faked): cuDNN's fused op vs the reference first, then, for a short
    reduction, the Triton kernel vs that winner; each choice cached under its own key."""
    from distilpose_kernels import conv_epilogue_triton as ct

    monkeypatch.setattr(ce, "_CHOICE", {})
    monkeypatch.setattr(ct, "TILE_OVERRIDE", (32, 16, 4))
    stub_cuda_timer.update(fused=1.0, reference=2.0, triton_path=triton_ms)
    (x, w, b, _), _, args = _make(TRITON_SHAPES[0], residual=False)
    ran = []
    ref = dk.conv2d_relu_reference(x, w, b, **args)

    def cudnn(*a):
        ran.append("cudnn")
        if not cudnn_ok:
            raise RuntimeError("no engine")
        return ref.clone()

    monkeypatch.setattr(ce, "_cudnn", cudnn)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failing cuDNN op warns
        got = ce._run(x, w, b, None, [2, 2], [1, 1], [1, 1], 1, "auto")  # TRITON_SHAPES[0]'s conv arguments
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    keys = list(ce._CHOICE)
    assert len(keys) == 2 and keys[1] == keys[0] + ("triton",)
    assert ce._CHOICE[keys[1]] is (want == "triton") and ce._CHOICE[keys[0]] is cudnn_ok


def test_agreement_tolerance_by_dtype():
    (x, w, b, r), _, args = _make(SHAPES[1])
    ref = dk.conv2d_relu_reference(x, w, b, r, **args)
    assert ce._agrees(ref * (1 + 1e-6), ref)
    assert not ce._agrees(dk.conv2d_relu_reference(x, w, None, r, **args), ref)  # bias dropped
    assert not ce._agrees(dk.conv2d_relu_reference(x, w, b, None, **args), ref)  # residual dropped
    refb = ref.bfloat16()
    assert ce._agrees((ref * (1 + 2 ** -8)).bfloat16(), refb)
    assert not ce._agrees(ref.half(), refb)  # dtype differs


# ----------------------------------------------------------------------------- ConvReLU2d


def test_convrelu2d_shares_parameters_and_keys():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    m = dk.ConvReLU2d.from_conv(conv)
    assert m.weight is conv.weight and m.bias is conv.bias
    assert list(m.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 4, 9, 7)
    r = torch.randn(2, 6, 5, 4)
    torch.testing.assert_close(m(x), torch.relu(conv(x)))
    torch.testing.assert_close(m(x, r), torch.relu(conv(x) + r))
    nb = dk.ConvReLU2d.from_conv(nn.Conv2d(4, 6, 1, bias=False))
    assert nb.bias is None and "relu=True" in repr(nb)


def test_convrelu2d_refuses_what_the_op_cannot_do():
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        dk.ConvReLU2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="integer padding"):
        dk.ConvReLU2d(4, 6, 3, padding="same")
    with pytest.raises(TypeError, match="conv: expected an nn.Conv2d"):
        dk.ConvReLU2d.from_conv(nn.Linear(3, 3))


# ----------------------------------------------------------------------------- model pass


def _random_bn_stats(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)


@pytest.mark.parametrize("preset,expected", [("distilpose_tiny", 2 + 3), ("tokenpose_tiny", None)])
def test_fuse_conv_epilogues_keeps_the_outputs(preset, expected):
    from distilpose.fuse import fuse_conv_bn_model, fuse_conv_epilogues
    from distilpose.models import build_model

    model = build_model(preset).eval()
    _random_bn_stats(model)
    folded = fuse_conv_bn_model(model)
    fused = fuse_conv_epilogues(folded)
    n = fused._distilpose_fused_epilogues
    assert n > 0 and (expected is None or n == expected)
    assert sum(isinstance(m, dk.ConvReLU2d) for m in fused.modules()) == n
    # every ReLU module left is one the forward code no longer calls, or an HRModule's fusion ReLU
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        a, b, c = model(x), folded(x), fused(x)
    for k in a:
        # same math; the downsample's bias is added with the last conv's (another rounding order)
        torch.testing.assert_close(c[k], b[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)
    again = fuse_conv_epilogues(fused)
    assert again._distilpose_fused_epilogues == n  # nothing left to fuse
    for k in a:
        torch.testing.assert_close(again(x)[k], c[k], rtol=0, atol=0)


def test_fuse_conv_epilogues_moves_the_downsample_bias_into_the_last_conv():
    """A Bottleneck with a downsample: after fusion its downsample conv has no bias (cuDNN would
    add it in a separate kernel), the last conv's bias is the sum of both, the output is the
    same; the original model's parameters are untouched."""
    from distilpose.fuse import fuse_conv_bn_model, fuse_conv_epilogues
    from distilpose.models.backbones.resnet_blocks import Bottleneck, make_layer

    layer = make_layer(Bottleneck, 16, 8, 2).eval()  # 16 -> 32 channels: the first block downsamples
    _random_bn_stats(layer)
    folded = fuse_conv_bn_model(layer)
    b3, bd = folded[0].conv3.bias.clone(), folded[0].downsample[0].bias.clone()
    fused = fuse_conv_epilogues(folded)
    assert fused[0].downsample[0].bias is None and fused[1].downsample is None
    torch.testing.assert_close(fused[0].conv3.bias, b3 + bd, rtol=0, atol=0)
    assert torch.equal(folded[0].conv3.bias, b3) and torch.equal(folded[0].downsample[0].bias, bd)
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), folded(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused(x), layer(x), rtol=1e-4, atol=1e-5)


def test_fuse_conv_epilogues_paper_student_counts():
    from distilpose.fuse import fuse_conv_bn_model, fuse_conv_epilogues
    from distilpose.models import build_model

    fused = fuse_conv_epilogues(fuse_conv_bn_model(build_model("distilpose_s").eval()))
    # 2 stem convs + 4 Bottlenecks x 3; the downsample conv has no ReLU after it
    assert fused._distilpose_fused_epilogues == 14


def test_fuse_conv_epilogues_needs_folded_bns_and_eval_mode():
    from distilpose.fuse import fuse_conv_epilogues
    from distilpose.models import build_model

    model = build_model("distilpose_tiny")
    with pytest.raises(RuntimeError, match="eval mode"):
        fuse_conv_epilogues(model)
    unfolded = fuse_conv_epilogues(model.eval())
    assert unfolded._distilpose_fused_epilogues == 0
    assert not any(isinstance(m, dk.ConvReLU2d) for m in unfolded.modules())


def test_fuse_conv_epilogues_sequential_pattern():
    from distilpose.fuse import fuse_conv_epilogues

    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 4, 1), nn.Identity(),  # no ReLU after it: left alone
                        nn.Conv2d(4, 5, 3), nn.ReLU()).eval()
    fused = fuse_conv_epilogues(seq)
    assert [type(m).__name__ for m in fused] == ["ConvReLU2d", "Identity", "Identity", "Conv2d", "Identity",
                                                "ConvReLU2d", "Identity"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), seq(x))


def test_engine_fuses_epilogues_with_fold_bn():
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_tiny").eval()
    _random_bn_stats(model)
    crops = torch.randn(3, 3, *model.input_size)
    plain = InferenceEngine(model, fold_bn=True, fuse_epilogues=False)
    fused = InferenceEngine(model, fold_bn=True)
    assert fused.fuse_epilogues and not plain.fuse_epilogues and "fuse_epilogues=True" in repr(fused)
    assert not InferenceEngine(model).fuse_epilogues
    a, b = plain(crops), fused(crops)
    for k in a:  # the same math (the downsample's bias added with the last conv's: another rounding order)
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fuse_epilogues: needs fold_bn=True"):
        InferenceEngine(model, fuse_epilogues=True)


def test_distiller_fuses_the_frozen_teachers_epilogues():
    from distilpose.models import build_model
    from distilpose.models.distiller import Distiller

    student, teacher = build_model("distilpose_tiny"), build_model("tokenpose_tiny")
    d = Distiller(student, teacher, fold_teacher_bn=True)
    assert d.teacher._distilpose_fused_epilogues > 0
    assert d.teacher.tde.fuse_pos_norm and all(layer.mlp.fuse_gelu for layer in d.teacher.tde.layers)
    assert all(layer.mlp.mlp_kernel for layer in d.teacher.tde.layers) and d.teacher.tde.fuse_add_norm
    assert not d.student.tde.fuse_add_norm
    assert not any(layer.mlp.mlp_kernel for layer in d.student.tde.layers)  # the trained student: plain
    assert not teacher.tde.fuse_pos_norm  # the caller's teacher is untouched
    plain = Distiller(copy.deepcopy(student), teacher, fold_teacher_bn=True, fuse_teacher_epilogues=False)
    assert not any(isinstance(m, dk.ConvReLU2d) for m in plain.teacher.modules()) and not plain.teacher.tde.fuse_pos_norm
    cl = Distiller(copy.deepcopy(student), teacher, fold_teacher_bn=True, teacher_channels_last=True).float()
    convs = [m for m in cl.teacher.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
                         if m.weight.shape[2:] != (1, 1) and m.weight.shape[1] > 1)
    x = torch.randn(2, 3, *teacher.input_size)
    with torch.no_grad():
        a, b, c = d.teacher(x), plain.teacher(x), cl.teacher(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GPU


GPU_SHAPES = [
    (32, 64, 64, 48, 64, 3, 1, 1, 1, 1),     # DistilPose-S Bottleneck 3x3
    (32, 64, 64, 48, 256, 1, 1, 0, 1, 1),    # its 1x1 expansion (+ residual)
    (2, 3, 256, 192, 64, 3, 2, 1, 1, 1),     # the stem's first conv at batch 2 (flip test)
    (3, 48, 17, 13, 48, 3, 1, 1, 1, 1),      # odd sizes
    (1, 96, 16, 12, 192, 3, 2, 1, 1, 1),     # an HRNet downsampler
]


# (shape, dtype, channels_last, residual): each distinct one builds a cuDNN fused plan (a
# runtime-compiled kernel), so the list is kept short; it covers every dtype, both layouts,
# with and without the residual, and each shape
GPU_CASES = [
    (GPU_SHAPES[0], torch.bfloat16, True, False), (GPU_SHAPES[1], torch.bfloat16, True, True),
    (GPU_SHAPES[2], torch.bfloat16, True, False), (GPU_SHAPES[3], torch.bfloat16, True, True),
    (GPU_SHAPES[4], torch.bfloat16, True, False),
    (GPU_SHAPES[0], torch.float32, False, False), (GPU_SHAPES[1], torch.float32, False, True),
    (GPU_SHAPES[2], torch.float32, False, False), (GPU_SHAPES[3], torch.float32, True, True),
    (GPU_SHAPES[1], torch.float16, False, True), (GPU_SHAPES[3], torch.float16, True, False),
    (GPU_SHAPES[1], torch.bfloat16, False, True),
]


_AOT = r"""
import distilpose_kernels.conv_epilogue_triton as ct

for p, prec in (("*bf16", "tf32"), ("*fp32", "tf32x3"), ("*fp32", "ieee")):
    for bp, bc, w in ct.TUNE_TILES:
        for has_r, bk in ((False, 32), (True, 16)):  # the stem; a block conv (residual, looped reduction)
            compile_(ct._small_conv_relu_kernel, dict(X=p, Wt=p, B=p, R=p, Y=p), {},
                     dict(KH=3, KW=3, HAS_B=True, HAS_R=has_r, PRECISION=prec, UPCAST=False, BLOCK_P=bp,
                          BLOCK_CO=bc, BLOCK_K=bk),
                     num_warps=w, num_stages=2)
"""


_NO_SPILLS = r"""
import os, subprocess, tempfile
import distilpose_kernels.conv_epilogue_triton as ct

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
frames = []
for p, prec in (("*bf16", "tf32"), ("*fp32", "tf32x3")):
    for bp, bc, w in ct.TUNE_TILES:
        for has_r, bk in ((False, 32), (True, 16)):
            k = compile_(ct._small_conv_relu_kernel, dict(X=p, Wt=p, B=p, R=p, Y=p), {},
                         dict(KH=3, KW=3, HAS_B=True, HAS_R=has_r, PRECISION=prec, UPCAST=False, BLOCK_P=bp,
                              BLOCK_CO=bc, BLOCK_K=bk), num_warps=w, num_stages=2)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                     check=True).stdout
            stack = int(out.split("STACK:")[1].split()[0])
            frames.append((p, bp, bc, w, has_r, stack))
assert len(frames) == 12 and all(f[-1] <= 32 for f in frames), frames
"""


@pytest.mark.slow
def test_triton_conv_tiles_do_not_spill_on_sm90():
    """Every autotuned tile, bf16 and fp32 (3xTF32), with and without the residual epilogue: at
    most a 32-byte stack frame in the sm_90 cubin (the 64-elements-per-thread tiles had 0.6-3.3 KB:
    spills in every K step)."""
    compile_for_sm90(_NO_SPILLS)


@pytest.mark.slow
def test_triton_small_reduction_conv_compiles_for_sm90_without_a_gpu():
    """Every tile the GPU autotuner may pick, bf16 and fp32 (3xTF32 and FMA dots), at the stem's
    3x3 kernel: lowered to an sm_90 cubin (ptxas catches what the interpreter lets pass)."""
    compile_for_sm90(_AOT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, True), (torch.float32, False), (torch.float16, True)])
def test_gpu_triton_stem_conv_matches_float64(dtype, channels_last):
    """The stem's first conv (3 -> 64, 3x3, stride 2) at 256 x 192, batch 8: backend="triton" and
    "auto" within twice the reference's error of float64 (the reference in the same dtype)."""
    shape = (8, 3, 256, 192, 64, 3, 2, 1, 1, 1)
    (x, w, b, _), (x64, w64, b64, _), args = _make(shape, dtype=dtype, residual=False, channels_last=channels_last,
                                                   device="cuda")
    want = _expected64(x64, w64, b64, None, args)
    e_ref = float((dk.conv2d_relu(x, w, b, **args, backend="reference").double() - want).abs().max())
    floor = 4 * torch.finfo(dtype).eps * float(want.abs().max())
    for backend in ("triton", None):
        got = dk.conv2d_relu(x, w, b, **args, backend=backend)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        e = float((got.double() - want).abs().max())
        assert e <= max(2 * e_ref, floor), (backend, e, e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,channels_last,residual", GPU_CASES, ids=str)
def test_gpu_cudnn_and_auto_match_float64(shape, dtype, channels_last, residual):
    (x, w, b, r), ref_in, args = _make(shape, dtype=dtype, residual=residual, channels_last=channels_last,
                                       device="cuda")
    want = _expected64(*ref_in, args)  # float64 on the device (cuDNN's fp64 path)
    # First-order forward error bound of a rounded conv + bias + residual + ReLU: 6 roundings
    # (x, w, b, r to the dtype, the conv output, the sum; TF32 operands for fp32 convs) of unit
    # roundoff u, each at most u times the magnitude of the terms summed, conv(|x|, |w|) + |b| + |r|.
    # Relative to the output it cannot be: cancellation brings outputs near 0.
    x64, w64, b64, r64 = ref_in
    terms = F.conv2d(x64.abs(), w64.abs(), b64.abs() if b64 is not None else None, args["stride"],
                     args["padding"], args["dilation"], args["groups"])
    terms = terms + r64.abs() if r64 is not None else terms
    unit_roundoff = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}[dtype]
    rel = 6 * unit_roundoff
    for backend in ("cudnn", "auto", "reference"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="conv2d_relu")  # "auto" must not reject the fused op
            got = dk.conv2d_relu(x, w, b, r, backend=backend, **args)
        assert got.dtype == dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt), backend
        err = (got.double() - want).abs()
        assert not err.isnan().any(), backend
        ratio = float((err / (rel * terms + 1e-6)).max())
        assert ratio <= 1.0, (backend, ratio, float(err.max()))


@pytest.mark.gpu
def test_gpu_auto_choice_is_recorded_and_graph_capturable():
    (x, w, b, r), _, args = _make(GPU_SHAPES[1], dtype=torch.bfloat16, channels_last=True, device="cuda")
    ce._CHOICE.clear()
    eager = dk.conv2d_relu(x, w, b, r, **args)
    assert len(ce._CHOICE) == 1
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = dk.conv2d_relu(x, w, b, r, **args)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_backward_through_the_fused_forward(monkeypatch):
    # exact fp32 convs: TF32 rounding would flip the ReLU mask of outputs near 0 between the paths
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    (x, w, b, r), _, args = _make(GPU_SHAPES[3], device="cuda")
    leaves = [t.requires_grad_(True) for t in (x, w, b, r)]
    refs = [t.detach().clone().requires_grad_(True) for t in leaves]
    gout = torch.randn_like(r)
    dk.conv2d_relu(*leaves, backend="cudnn", **args).backward(gout)
    dk.conv2d_relu_reference(*refs, **args).backward(gout)
    for a, c in zip(leaves, refs):
        torch.testing.assert_close(a.grad, c.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["distilpose_s", "tokenpose_teacher"])
def test_gpu_engine_with_fused_epilogues_matches(preset, monkeypatch):
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    # fp32 convs in every path: TF32 rounding differs between cuDNN's fused and unfused algorithms
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = build_model(preset).eval()
    _random_bn_stats(model)
    crops = torch.randn(4, 3, *model.input_size, device="cuda")
    engines = dict(
        a=InferenceEngine(model, device="cuda", fold_bn=True, fuse_epilogues=False, fuse_pos_norm=False,
                          fuse_mlp=False, triton_linears=False, mlp_kernel=False, fuse_add_norm=False),
        b=InferenceEngine(model, device="cuda", fold_bn=True, cuda_graph=True, precision="bf16",
                          cast_model=True, channels_last=True),
        c=InferenceEngine(model, device="cuda", fold_bn=True, cuda_graph=True),
    )
    if engines["a"].kind == "student":
        a, b, c = (engines[k](crops) for k in "abc")
        torch.testing.assert_close(c["keypoints"], a["keypoints"], rtol=1e-3, atol=0.05)
        err = (b["keypoints"] - a["keypoints"]).abs()
        assert float(err.median()) < 1.0  # bf16 end to end: pixels of a 256x192 crop
    else:
        # a heatmap model at random init has near-tied peaks: its decoded argmax jumps between
        # pixels on rounding noise, so the fused paths are compared on the heatmaps themselves
        with torch.no_grad():
            a, b, c = (engines[k]._model_out(crops)["heatmaps"].float() for k in "abc")
        torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        assert float((b - a).norm() / a.norm()) < 2e-2  # bf16 end to end


@pytest.mark.gpu
def test_gpu_graph_engine_decides_its_fused_ops_on_device_time(monkeypatch):
    """InferenceEngine(cuda_graph=True) warms up and captures inside timing_for_cuda_graphs():
    every "auto" decision it makes is timed on device time, and its keypoints match the eager
    engine's (which decides per call)."""
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine
    from distilpose_kernels import _utils, mlp

    monkeypatch.setattr(ce, "_CHOICE", {})
    monkeypatch.setattr(mlp, "_CHOICE", {})
    monkeypatch.setattr(_utils, "_DECISIONS", [])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = build_model("distilpose_tiny").eval()
    _random_bn_stats(model)
    crops = torch.randn(2, 3, *model.input_size, device="cuda")
    graphed = InferenceEngine(model, device="cuda", fold_bn=True, cuda_graph=True)(crops)
    decided = dk.auto_choices()
    assert decided and {d["timing"] for d in decided} == {"device"}, decided
    assert all(d["fused_ms"] is None or d["fused_ms"] > 0 for d in decided)
    eager = InferenceEngine(model, device="cuda", fold_bn=True)(crops)
    assert {d["timing"] for d in dk.auto_choices()[len(decided):]} <= {"call"}
    torch.testing.assert_close(graphed["keypoints"], eager["keypoints"], rtol=1e-3, atol=0.05)


def test_engine_fuses_the_pos_norm_step_by_default_and_not_under_compile():
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_tiny").eval()
    crops = torch.randn(2, 3, *model.input_size)
    on = InferenceEngine(model)
    off = InferenceEngine(model, fuse_pos_norm=False)
    assert on.model.tde.fuse_pos_norm and not off.model.tde.fuse_pos_norm and not model.tde.fuse_pos_norm
    assert all(layer.mlp.fuse_gelu for layer in on.model.tde.layers) and on.fuse_mlp
    assert not any(layer.mlp.fuse_gelu for layer in model.tde.layers)
    compiled = InferenceEngine(model, compile=True)
    assert not compiled.model.tde.fuse_pos_norm and not compiled.model.tde.layers[0].mlp.fuse_gelu

    def linears(e):
        return {m.triton_linears for layer in e.model.tde.layers for m in (layer.attn, layer.mlp)}

    # the TDE's Linears through distilpose_kernels.linear: fp32 engines only, not under compile
    assert linears(on) == {True} and on.triton_linears and "triton_linears=True" in repr(on)
    assert linears(compiled) == {False} and linears(InferenceEngine(model, precision="bf16")) == {False}
    assert linears(InferenceEngine(model, triton_linears=False)) == {False}
    assert not any(layer.attn.triton_linears for layer in model.tde.layers)
    # the whole MLP through fused_mlp(_add_norm) (its "auto" times one kernel, the reference and
    # two GEMM ops): every engine but compiled ones
    bf16 = InferenceEngine(model, precision="bf16")
    assert all(layer.mlp.mlp_kernel for e in (bf16, on) for layer in e.model.tde.layers)
    assert "mlp_kernel=True" in repr(bf16) and "mlp_kernel=True" in repr(on)
    assert not any(layer.mlp.mlp_kernel for e in (compiled, InferenceEngine(model, precision="bf16", compile=True),
                                                   InferenceEngine(model, precision="bf16", mlp_kernel=False))
                   for layer in e.model.tde.layers)
    assert not any(layer.mlp.mlp_kernel for layer in model.tde.layers)
    # the residual adds + LayerNorms in the GEMM epilogues: on unless compile
    assert on.model.tde.fuse_add_norm and bf16.model.tde.fuse_add_norm and "fuse_add_norm=True" in repr(on)
    assert not compiled.model.tde.fuse_add_norm and not model.tde.fuse_add_norm
    assert not InferenceEngine(model, fuse_add_norm=False).model.tde.fuse_add_norm
    # the qkv projection inside the attention kernel (qkv_attention): on unless compile
    assert all(layer.attn.fuse_qkv for e in (on, bf16) for layer in e.model.tde.layers) and "fuse_qkv=True" in repr(on)
    assert not any(layer.attn.fuse_qkv for e in (compiled, InferenceEngine(model, fuse_qkv=False), model)
                   for layer in (e.model.tde.layers if hasattr(e, "model") else e.tde.layers))
    from distilpose.fuse import set_tde_fusions

    with pytest.raises(ValueError, match=r"set_tde_fusions: unknown switches \['fuse_foo'\]"):
        set_tde_fusions(model, fuse_foo=True)
    a, b = on(crops), off(crops)
    for k in a:  # the CPU runs the op's reference: the same ops as the unfused step
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_cudnn_call_arguments_and_benchmark_flag(monkeypatch):
    """The fused path calls cuDNN's ops with ATen's argument order (z, alpha=1, bias), and runs
    them with cudnn.benchmark off (heuristics plan), restoring the caller's flag."""
    calls = []
    monkeypatch.setattr(torch, "cudnn_convolution_relu",
                        lambda *a: calls.append(("relu", a, torch.backends.cudnn.benchmark)) or "r")
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu",
                        lambda *a: calls.append(("add_relu", a, torch.backends.cudnn.benchmark)) or "a")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    x, w, z = object(), object(), object()
    b = torch.randn(3)  # contiguous: passed as is
    assert ce._cudnn(x, w, b, None, [2, 2], [1, 1], [1, 1], 1) == "r"
    assert ce._cudnn(x, w, b, z, [1, 1], [0, 0], [1, 1], 2) == "a"
    assert calls[0] == ("relu", (x, w, b, [2, 2], [1, 1], [1, 1], 1), False)
    assert calls[1] == ("add_relu", (x, w, z, 1.0, b, [1, 1], [0, 0], [1, 1], 2), False)
    assert torch.backends.cudnn.benchmark is True
    strided = torch.randn(6)[::2]  # a strided bias view goes to cuDNN as a contiguous copy
    ce._cudnn(x, w, strided, None, [1, 1], [0, 0], [1, 1], 1)
    assert calls[2][1][2].is_contiguous() and torch.equal(calls[2][1][2], strided)


@pytest.mark.parametrize("tde_path", ["pos_norm", "add_norm"])
@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_fully_fused_model_compiles_without_graph_breaks(preset, tde_path):
    """Folded + epilogue-fused + fused-norm model (ConvReLU2d, add_pos_layernorm with residual or
    the GEMM add + LayerNorm epilogues and the one-kernel MLP, upsample_sum) traces with
    fullgraph=True and gives the eager outputs."""
    from distilpose.fuse import fuse_conv_bn_model, fuse_conv_epilogues
    from distilpose.models import build_model

    model = build_model(preset).eval()
    model.check_finite = False
    fused = fuse_conv_epilogues(fuse_conv_bn_model(model))
    fused.tde.fuse_pos_norm = True
    fused.tde.fuse_add_norm = tde_path == "add_norm"
    for i, layer in enumerate(fused.tde.layers):
        layer.mlp.fuse_gelu = True
        layer.mlp.mlp_kernel = tde_path == "add_norm" and i % 2 == 0
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        got = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
        want = fused(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("shape,residual", [((2, 64, 64, 48, 64, 3, 1, 1, 1, 1), False),
                                            ((2, 64, 64, 48, 256, 1, 1, 0, 1, 1), True),
                                            ((2, 256, 64, 48, 64, 1, 1, 0, 1, 1), False)], ids=str)
def test_gpu_triton_block_convs_match_float64(shape, residual, dtype, channels_last):
    """DistilPose-S's Bottleneck convs at the batch-1 flip engine's batch 2: backend="triton"
    (looped reduction, residual epilogue) and "auto" within twice the same-dtype reference's
    error of float64."""
    (x, w, b, r), (x64, w64, b64, r64), args = _make(shape, dtype=dtype, residual=residual,
                                                     channels_last=channels_last, device="cuda")
    want = _expected64(x64, w64, b64, r64, args)
    e_ref = float((dk.conv2d_relu(x, w, b, r, **args, backend="reference").double() - want).abs().max())
    floor = 4 * torch.finfo(dtype).eps * float(want.abs().max())
    for backend in ("triton", None):
        got = dk.conv2d_relu(x, w, b, r, **args, backend=backend)
        e = float((got.double() - want).abs().max())
        assert e <= max(2 * e_ref, floor), (backend, e, e_ref)
