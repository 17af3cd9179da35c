"""linear_gelu (the TDE MLP's fc1 + bias + exact GELU in one kernel) and linear (the same GEMM
without the GELU): Triton kernel (CPU interpreter, or the GPU) vs float64, gradients,
registration, the "auto" choice, errors, the fused TDE MLP, and the fp32 dot precision policy
(3xTF32) with a float64 check of the method itself."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from sm90 import compile_for_sm90
from distilpose_kernels import mlp as mlp_mod
from distilpose_kernels._utils import cdiv, fp32_dot_precision

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_tile(monkeypatch):
    if DEV == "cpu":  # the interpreter is slow: small tiles, several of them per output
        from distilpose_kernels import mlp_triton

        monkeypatch.setattr(mlp_triton, "TILE_OVERRIDE", mlp_triton.GemmTile(16, 16, 16, 4, 1))
        monkeypatch.setattr(mlp_triton, "MLP_TILE_OVERRIDE", mlp_triton.RowTile(16, 16, 4, 1))
        monkeypatch.setattr(mlp_triton, "ADD_NORM_TILE_OVERRIDE", mlp_triton.RowTile(16, 16, 4, 1))


def _inputs(shape, k, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=DEV, dtype=dtype)  # noqa: E731
    return (cast(x), cast(w), cast(b)), (x.to(DEV), w.to(DEV), None if b is None else b.to(DEV))


CASES = [((37,), 24, 40), ((2, 9), 48, 33), ((1,), 7, 3), ((3, 17), 32, 96)]


OPS = {"linear_gelu": (lambda *a, **k: dk.linear_gelu(*a, **k), lambda x, w, b: F.gelu(F.linear(x, w, b))),
       "linear": (lambda *a, **k: dk.linear(*a, **k), F.linear)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_linear_gelu_matches_float64(case, bias, op, monkeypatch):
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    fn, ref = OPS[op]
    shape, k, n = case
    (x, w, b), (x64, w64, b64) = _inputs(shape, k, n, bias=bias, seed=k + n)
    got = fn(x, w, b, backend="triton")
    want = ref(x64, w64, b64)
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


@pytest.mark.parametrize("op", list(OPS))
def test_linear_gelu_gradients_and_registration(op):
    fn, ref = OPS[op]
    lib = getattr(torch.ops.distilpose, op)
    (x, w, b), _ = _inputs((3, 11), 24, 40, seed=8)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    refs = [t.clone().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref(*refs).backward(g)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: lib(*t, "reference"), (x64, w64, b64), eps=1e-6, atol=1e-5)
    torch.library.opcheck(lib.default, (x.clone().requires_grad_(), w, b, "triton"))
    torch.library.opcheck(lib.default, (x, w, None, "reference"))
    f = torch.compile(lambda a: fn(a, w, b, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), 2 * ref(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_linear_gelu_autocast_and_errors(op):
    fn, ref = OPS[op]
    (x, w, b), _ = _inputs((4,), 16, 8, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x.cpu(), w.cpu(), b.cpu())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref(x.cpu().bfloat16(), w.cpu().bfloat16(), b.cpu().bfloat16()))
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
            fn(**{**base, **change})


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


def _mlp_inputs(shape, k, hid, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*shape, k, generator=g, dtype=torch.float64), torch.randn(hid, k, generator=g, dtype=torch.float64) / k ** 0.5,
         torch.randn(hid, generator=g, dtype=torch.float64) if bias else None,
         torch.randn(n, hid, generator=g, dtype=torch.float64) / hid ** 0.5,
         torch.randn(n, generator=g, dtype=torch.float64) if bias else None]
    return [None if a is None else a.to(device=DEV, dtype=dtype) for a in t], [None if a is None else a.to(DEV) for a in t]


MLP_CASES = [((37,), 24, 40, 24), ((2, 9), 48, 72, 33), ((1,), 7, 9, 3), ((3, 5), 20, 100, 17)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", MLP_CASES, ids=str)
def test_fused_mlp_matches_float64(case, bias, monkeypatch):
    """Odd sizes everywhere (K, hidden and N not multiples of the tiles), batch 1, no biases;
    the output is poisoned first, so every element must be written."""
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    shape, k, hid, n = case
    args, args64 = _mlp_inputs(shape, k, hid, n, bias=bias, seed=k + hid)
    got = dk.fused_mlp(*args, backend="triton")
    want = dk.fused_mlp_reference(*args64)
    assert got.shape == (*shape, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_mlp_low_precision_and_strided_input(dtype):
    args, _ = _mlp_inputs((2, 19), 48, 64, 40, dtype=dtype, seed=3)
    want = dk.fused_mlp_reference(*[a.double() for a in args])
    got = dk.fused_mlp(*args, backend="triton")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)
    xt = args[0].transpose(0, 1)  # (19, 2, 48) non-contiguous
    torch.testing.assert_close(dk.fused_mlp(xt, *args[1:], backend="triton").double(),
                               dk.fused_mlp_reference(xt.double(), *[a.double() for a in args[1:]]), rtol=3e-2, atol=3e-2)


def test_fused_mlp_gradients_registration_autocast_and_errors():
    args, _ = _mlp_inputs((3, 7), 24, 40, 16, seed=11)
    leaves = [a.clone().requires_grad_() for a in args]
    refs = [a.clone().requires_grad_() for a in args]
    out = dk.fused_mlp(*leaves, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    dk.fused_mlp_reference(*refs).backward(g)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)
    a64 = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *t: torch.ops.distilpose.fused_mlp(*t, "reference"), a64, eps=1e-6, atol=1e-5)
    op = torch.ops.distilpose.fused_mlp.default
    torch.library.opcheck(op, (args[0].clone().requires_grad_(), *args[1:], "triton"))
    torch.library.opcheck(op, (args[0], args[1], None, args[3], None, "reference"))
    f = torch.compile(lambda x: dk.fused_mlp(x, *args[1:], backend="triton") + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(args[0]), dk.fused_mlp_reference(*args) + 1, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dk.fused_mlp(*[a.cpu() for a in args])
    assert got.dtype == torch.bfloat16
    x, w1, b1, w2, b2 = args
    cases = [
        (dict(fc2_weight=w2[:, :5]), ValueError, "fc2_weight: expected shape"),
        (dict(fc1_weight=w1[:, :5]), ValueError, "fc1_weight: expected shape"),
        (dict(fc2_bias=b2[:3]), ValueError, "fc2_bias: expected shape"),
        (dict(fc1_bias=b1.double()), TypeError, "fc1_bias: expected dtype"),
        (dict(fc2_weight=w2.half()), TypeError, "fc2_weight: expected dtype"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ]
    base = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.fused_mlp(**{**base, **change})


def test_fused_mlp_wide_output_runs_the_reference_or_says_why():
    args, _ = _mlp_inputs((4,), 8, 16, mlp_mod.MLP_MAX_N + 1, seed=2)
    with pytest.raises(ValueError, match="fc2_weight: backend='triton' supports at most 512 output features, got 513"):
        dk.fused_mlp(*args, backend="triton")
    torch.testing.assert_close(dk.fused_mlp(*args), dk.fused_mlp_reference(*args))


def test_fused_mlp_auto_choice_key_and_fp32_tolerance(tuner, monkeypatch):
    """On CUDA, "auto" decides once per (sizes, dtype, device, precision) under the name fused_mlp,
    then times the two-GEMM form against that choice under its own key (the precision last)."""
    seen = []
    monkeypatch.setattr(mlp_mod, "_choose", lambda key, fused, ref, op, what=None: seen.append((key, op)) or False)
    args, _ = _mlp_inputs((5,), 8, 16, 4, seed=1)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    got = mlp_mod._mlp_run(*args, "auto")
    # the device index and the fp32 dot precision are those of the tensors' real device
    # (None / "ieee" on a CPU machine; 0 / the GPU's fp32 dot precision on a GPU machine)
    x = args[0]
    want_precision = "ieee" if x.device.type == "cpu" else fp32_dot_precision(x.device)
    key = ("mlp", 5, 8, 16, 4, torch.float32, x.device.index, want_precision)
    assert seen == [(key, "fused_mlp"), (("linear_gelu + linear",) + key, "fused_mlp")]
    torch.testing.assert_close(got, dk.fused_mlp_reference(*args))


@pytest.mark.parametrize("op", ["mlp", "mlp_add_norm"])
@pytest.mark.parametrize("kernel_ms,gemms_ms,want", [(1.0, 0.5, "gemms"), (1.0, 3.0, "kernel"), (5.0, 0.5, "gemms"),
                                                    (5.0, 3.0, "reference")])
def test_whole_mlp_auto_times_the_two_gemm_form_as_a_third_way(op, kernel_ms, gemms_ms, want, stub_cuda_timer,
                                                                 monkeypatch):
    """fused_mlp / fused_mlp_add_norm "auto" (CUDA faked, timings stubbed): the one-kernel MLP vs
    the reference ops first, then linear_gelu + linear(_add_norm) vs that winner; the faster
    of the three runs, and its output is the same."""
    monkeypatch.setattr(mlp_mod, "_CHOICE", {})
    ran = []

    def named(name, fn):
        def run(*a, **k):
            ran.append(name)
            return fn(*a, **k)

        return run

    real_kernel, real_add_norm_kernel = mlp_mod._mlp_fused, mlp_mod._add_norm_kernel
    monkeypatch.setattr(mlp_mod, "_mlp_fused", named("kernel", real_kernel))
    monkeypatch.setattr(mlp_mod, "_add_norm_kernel", named("kernel", real_add_norm_kernel))
    real_lg = mlp_mod.linear_gelu
    monkeypatch.setattr(mlp_mod, "linear_gelu", named("gemms", lambda *a, **k: real_lg(*a, backend="triton")))
    monkeypatch.setattr(mlp_mod, "linear", lambda *a, **k: mlp_mod._call("linear", *a, "triton"))
    real_lan = mlp_mod.linear_add_norm
    monkeypatch.setattr(mlp_mod, "linear_add_norm", lambda *a, **k: real_lan(*a, **k, backend="triton"))
    times = {"kernel": kernel_ms, "reference": 2.0, "gemms": gemms_ms}
    from distilpose_kernels import _utils

    def timer(fn, rounds=3, reps=5, device_only=False):
        n = len(ran)
        fn()
        tag = ran[n] if len(ran) > n else "reference"
        return times[tag]

    monkeypatch.setattr(_utils, "cuda_time_ms", timer)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    if op == "mlp":
        args, _ = _mlp_inputs((2, 7), 16, 24, 16, seed=3)
        got = mlp_mod._mlp_run(*args, "auto")
        want_out = dk.fused_mlp_reference(*args)
    else:
        args, _ = _add_norm_inputs(2, 7, 16, 16, 3, 24, seed=3)
        *main, pos = args
        ref = lambda: dk.fused_mlp_add_norm_reference(*main, 1e-5, pos)  # noqa: E731
        got = mlp_mod._add_norm_run(main[0], tuple(main[1:5]), main[5], main[6], main[7], pos[0], 1e-5, "auto", ref)
        want_out = ref()
    ran.clear()
    if op == "mlp":
        again = mlp_mod._mlp_run(*args, "auto")  # decided: the winner runs once, untimed
    else:
        again = mlp_mod._add_norm_run(main[0], tuple(main[1:5]), main[5], main[6], main[7], pos[0], 1e-5, "auto", ref)
    assert ran[:1] == ([] if want == "reference" else [want])  # the reference ops are not tagged
    for g, a, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, again, want_out))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=2e-5)


def test_linear_add_norm_auto_times_linear_plus_add_pos_layernorm(tuner, monkeypatch):
    """linear_add_norm "auto" (CUDA faked): after the kernel vs the reference ops, linear +
    add_pos_layernorm (two of our ops) is timed against the winner under its own key; chosen,
    it gives the same (x_out, y)."""
    seen = []

    def choose(key, fused, ref, op, what=None):
        seen.append(key)
        return key[0] == "linear + add_pos_layernorm"  # the second way wins, the kernel does not

    monkeypatch.setattr(mlp_mod, "_choose", choose)
    from distilpose_kernels import attention as attn

    monkeypatch.setattr(attn, "select_triton_backend", lambda *a, **k: "reference")  # no kernels on the CPU
    monkeypatch.setattr(mlp_mod, "linear", lambda x, w, b=None, backend=None: F.linear(x, w, b))
    args, _ = _add_norm_inputs(2, 7, 16, 24, 3, seed=4)
    *main, pos = args
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    ref = lambda: dk.linear_add_norm_reference(*main, 1e-5, pos)  # noqa: E731
    got = mlp_mod._add_norm_run(main[0], tuple(main[1:3]), main[3], main[4], main[5], pos[0], 1e-5, "auto", ref)
    assert len(seen) == 2 and seen[1] == ("linear + add_pos_layernorm",) + seen[0]
    for g, w in zip(got, ref()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_auto_decisions_under_autocast_are_kept_apart(tuner, monkeypatch):
    """A decision made under autocast (whose reference runs autocast's ops) is not reused for the
    same dtypes without autocast (a model cast to bf16), and the other way round."""
    seen = []
    monkeypatch.setattr(mlp_mod, "_choose", lambda key, fused, ref, op, what=None: seen.append(key) or False)
    args, _ = _mlp_inputs((5,), 8, 16, 4, seed=2)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    mlp_mod._mlp_run(*args, "auto")
    with torch.autocast(args[0].device.type, dtype=torch.bfloat16):
        mlp_mod._mlp_run(*args, "auto")
    seen = [k for k in seen if k[0] != "linear_gelu + linear"]  # the two-GEMM form's own choices
    assert len(seen) == 2 and seen[1] == ("autocast",) + seen[0]
    assert seen[0][-1] == seen[1][-1]  # the precision stays last: it sets the agreement tolerance


# ----------------------------------------------------------------------------- + residual + LayerNorm epilogue


def _add_norm_inputs(b, L, k, n, p, hid=None, dtype=torch.float32, affine=True, bias=True, seed=0):
    """(x, weights..., residual, norm_weight, norm_bias, pos) in dtype and in float64; the
    residual is a non-contiguous view (its strides are honoured)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    weights = ([r(hid, k, scale=k ** -0.5), r(hid) if bias else None, r(n, hid, scale=hid ** -0.5), r(n) if bias else None]
               if hid else [r(n, k, scale=k ** -0.5), r(n) if bias else None])
    t = [r(b, L, k), *weights, r(L, b, n).transpose(0, 1), (r(n).abs() + 0.5) if affine else None,
         r(n) if affine else None, r(1, p, n) if p else None]
    cast = [None if a is None else a.to(device=DEV, dtype=dtype) for a in t]
    return cast, [None if a is None else a.to(DEV) for a in t]


ADD_NORM_OPS = {"linear": (lambda *a, **k: dk.linear_add_norm(*a, **k), dk.linear_add_norm_reference, None),
                "mlp": (lambda *a, **k: dk.fused_mlp_add_norm(*a, **k), dk.fused_mlp_add_norm_reference, 56)}


def _split(args):  # -> (x, weights..., residual, norm_weight, norm_bias), pos
    return args[:-1], args[-1]


@pytest.mark.parametrize("op", list(ADD_NORM_OPS))
@pytest.mark.parametrize("b,L,k,n,p,affine,bias", [
    (2, 11, 24, 40, 7, True, True),  # pos on the last 7 of 11 tokens: a 16-row block spans 2 sequences
    (1, 5, 7, 17, 5, True, False),  # batch 1, pos on every token, odd K and N
    (3, 9, 32, 24, 0, False, True),  # no pos, no affine LayerNorm
])
def test_add_norm_ops_match_float64(op, b, L, k, n, p, affine, bias, monkeypatch):
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    fn, ref, hid = ADD_NORM_OPS[op]
    args, args64 = _add_norm_inputs(b, L, k, n, p, hid, affine=affine, bias=bias, seed=L + n)
    (*main, pos), (*main64, pos64) = args, args64
    x_out, y = fn(*main, 1e-5, pos, backend="triton")
    want_x, want_y = ref(*main64, 1e-5, pos64)
    assert x_out.shape == y.shape == (b, L, n) and x_out.dtype == y.dtype == torch.float32
    torch.testing.assert_close(x_out.double(), want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tile,b,L,k,n,p", [
    ((32, 16, 16, 3), 2, 11, 24, 40, 7),  # 22 rows in one 32-row block: both 16-row epilogue steps, one partly past M
    ((16, 16, 16, 3), 1, 5, 7, 17, 5),  # K = 7 in 3 slices of 16: two slices sum nothing; N = 17 in two column tiles
    ((16, 32, 16, 2), 3, 9, 50, 24, 0),  # a column tile wider than N, two slices of a K that is not a multiple of 16
])
def test_linear_add_norm_split_tiles_match_float64(tile, b, L, k, n, p, monkeypatch):
    """The split tiles of linear_add_norm (programs per row block x column tile x K slice; the
    row block's last program sums the partials and runs the add + LayerNorm) against float64,
    into NaN-filled outputs."""
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    monkeypatch.setattr(mlp_triton, "ADD_NORM_TILE_OVERRIDE", mlp_triton.SplitTile(*tile, 4, 1))
    args, args64 = _add_norm_inputs(b, L, k, n, p, seed=k + n)
    (*main, pos), (*main64, pos64) = args, args64
    x_out, y = dk.linear_add_norm(*main, 1e-5, pos, backend="triton")
    want_x, want_y = dk.linear_add_norm_reference(*main64, 1e-5, pos64)
    torch.testing.assert_close(x_out.double(), want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=2e-5)
    # the kernel leaves its counters at zero: relaunched on the same buffer (as the GPU
    # autotuner's timing runs do) it runs every row block's epilogue again, to the same bits
    shared = torch.zeros(64, dtype=torch.int32, device=DEV)
    monkeypatch.setattr(mlp_triton, "_new_counts", lambda n, device: shared[:n])
    for _ in range(2):
        again = dk.linear_add_norm(*main, 1e-5, pos, backend="triton")
        assert torch.equal(again[0], x_out) and torch.equal(again[1], y)
        assert not shared.any()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("tile,m,k,n", [
    ((16, 16, 16, 3), 37, 24, 40),  # 3 slices of 16 over K = 24: the last one sums nothing
    ((16, 32, 16, 2), 18, 7, 3),  # K = 7: one slice sums nothing; a tile wider than N
    ((16, 16, 16, 2), 51, 50, 96),  # K not a multiple of the step; 4 x 6 tiles
])
def test_linear_split_k_tiles_match_float64(op, tile, m, k, n, monkeypatch):
    """The split-K tiles of linear / linear_gelu (the output tile's last program sums the K
    slices' partials, then bias and GELU) against float64 into NaN-filled outputs; relaunched on
    one shared counter buffer, which the kernel leaves at zero."""
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    monkeypatch.setattr(mlp_triton, "TILE_OVERRIDE", mlp_triton.GemmTile(*tile[:3], 4, 1, tile[3]))
    shared = torch.zeros(64, dtype=torch.int32, device=DEV)
    monkeypatch.setattr(mlp_triton, "_new_counts", lambda c, device: shared[:c])
    fn, ref = OPS[op]
    (x, w, b), (x64, w64, b64) = _inputs((m,), k, n, seed=m + k)
    got = fn(x, w, b, backend="triton")
    assert not shared.any()
    assert torch.equal(fn(x, w, b, backend="triton"), got)
    torch.testing.assert_close(got.double(), ref(x64, w64, b64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile,b,L,k,hid,n,p", [
    ((32, 16, 3), 2, 11, 24, 56, 40, 7),  # 22 rows in one 32-row block: both 16-row epilogue steps
    ((16, 16, 7), 1, 5, 7, 20, 17, 5),  # 20 hidden in 7 slices of 16: five slices sum nothing
    ((16, 32, 2), 3, 9, 50, 48, 24, 0),  # a hidden step wider than the slice's remainder
])
@pytest.mark.parametrize("add_norm", [True, False])
def test_mlp_split_tiles_match_float64(tile, b, L, k, hid, n, p, add_norm, monkeypatch):
    """The split tiles of the whole-MLP kernel (programs per row block x hidden slice; the row
    block's last program sums the slices' fc2 shares and runs the epilogue), with and without
    the add + LayerNorm epilogue, against float64 into NaN-filled outputs; relaunched on one
    shared counter buffer, which the kernel leaves at zero."""
    from distilpose_kernels import mlp_triton

    monkeypatch.setattr(mlp_triton, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                            device=device, dtype=dtype))
    monkeypatch.setattr(mlp_triton, "MLP_TILE_OVERRIDE", mlp_triton.SplitMlpTile(*tile, 4, 1))
    args, args64 = _add_norm_inputs(b, L, k, n, p, hid, seed=k + hid)
    (*main, pos), (*main64, pos64) = args, args64
    shared = torch.zeros(64, dtype=torch.int32, device=DEV)
    monkeypatch.setattr(mlp_triton, "_new_counts", lambda m, device: shared[:m])
    runs = []
    for _ in range(2):
        if add_norm:
            runs.append(dk.fused_mlp_add_norm(*main, 1e-5, pos, backend="triton"))
        else:
            runs.append((dk.fused_mlp(*main[:5], backend="triton"),))
        assert not shared.any()
    if add_norm:
        want = dk.fused_mlp_add_norm_reference(*main64, 1e-5, pos64)
    else:
        want = (dk.fused_mlp_reference(*main64[:5]),)
    for got, again in zip(runs[0], runs[1]):
        assert torch.equal(got, again)
    for got, w in zip(runs[0], want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=2e-5)


def test_split_counters_lends_one_buffer_to_every_split_kernel(monkeypatch):
    """dk.split_counters(buf): the split tiles count in buf (no new zeroed tensor per call) and
    leave it at zero; calls needing more counters than buf holds get their own; outside, each
    call gets a new one; bad buffers are refused by name."""
    from distilpose_kernels import mlp_triton as mt

    buf = torch.zeros(40, dtype=torch.int32, device=DEV)
    with dk.split_counters(buf):
        assert mt._new_counts(12, buf.device).data_ptr() == buf.data_ptr()
        big = mt._new_counts(41, buf.device)
        assert big.data_ptr() != buf.data_ptr() and big.numel() == 41 and not big.any()
        monkeypatch.setattr(mt, "ADD_NORM_TILE_OVERRIDE", mt.SplitTile(16, 16, 16, 3, 4, 1))
        monkeypatch.setattr(mt, "TILE_OVERRIDE", mt.GemmTile(16, 16, 16, 4, 1, 2))
        monkeypatch.setattr(mt, "MLP_TILE_OVERRIDE", mt.SplitMlpTile(16, 16, 3, 4, 1))
        args, args64 = _add_norm_inputs(2, 11, 24, 40, 7, seed=3)
        for _ in range(2):
            got = dk.linear_add_norm(*args[:-1], 1e-5, args[-1], backend="triton")
            assert not buf.any()
        want = dk.linear_add_norm_reference(*args64[:-1], 1e-5, args64[-1])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5)
        (x, w, b), (x64, w64, b64) = _inputs((37,), 24, 40, seed=2)
        torch.testing.assert_close(dk.linear_gelu(x, w, b, backend="triton").double(),
                                   F.gelu(F.linear(x64, w64, b64)), rtol=1e-5, atol=1e-5)
        assert not buf.any()
    assert mt._new_counts(12, buf.device).data_ptr() != buf.data_ptr()
    for bad, msg in ((buf.long(), "counts: expected dtype"), (buf.view(5, 8), "counts: expected a 1-D"),
                     (buf[::2], "counts: expected a contiguous")):
        with pytest.raises((TypeError, ValueError), match=msg):
            with dk.split_counters(bad):
                pass


def test_linear_add_norm_split_tiles_only_below_the_row_limit(monkeypatch):
    """The GPU launchers' tile sets: the split tiles of linear_add_norm and of the MLP (and their
    split x M x N workspace) only up to SPLIT_MAX_ROWS rows; checked on the host-side choice, since the interpreter has no
    autotuner."""
    from distilpose_kernels import mlp_triton as mt

    assert all(isinstance(t, mt.SplitTile) for t in mt.ADD_NORM_SPLIT_TILES)
    for t in mt.ADD_NORM_SPLIT_TILES:  # the epilogue walks a row block in EPI_M-row steps
        c = mt._add_norm_config(t)
        assert c["BLOCK_M"] % c["EPI_M"] == 0 and c["TILE_N"] > 0 and c["SPLIT_K"] >= 1
    assert mt._add_norm_grid(546, 192, mt._add_norm_config(mt.SplitTile(32, 64, 32, 3, 4, 3))) == (18, 9)
    assert mt._add_norm_grid(546, 192, mt._add_norm_config(mt.ADD_NORM_TUNE_TILES[0])) == (9, 1)
    assert all(t.split_k > 1 for t in mt.SPLIT_TILES) and all(t.split_k == 1 for t in mt.TUNE_TILES)
    assert mt._gemm_grid(546, 576, mt._gemm_config(mt.SPLIT_TILES[0])) == (18 * 9, mt.SPLIT_TILES[0].split_k)
    for t in mt.MLP_SPLIT_TILES:
        c = mt._mlp_config(t)
        assert c["BLOCK_M"] % c["EPI_M"] == 0 and c["SPLIT_H"] > 1
        assert mt._split_grid(546, c, "SPLIT_H") == (cdiv(546, t.block_m), t.split_h)
    if mt._ADD_NORM_TUNED is not None:  # a GPU build: the tuners' configs
        assert {c.kwargs["TILE_N"] for c in mt._ADD_NORM_TUNED.configs} == {0}
        assert len(mt._ADD_NORM_TUNED_SMALL.configs) == len(mt.ADD_NORM_TUNE_TILES) + len(mt.ADD_NORM_SPLIT_TILES)
        assert {c.kwargs["SPLIT_H"] for c in mt._MLP_TUNED.configs} == {1}
        assert {c.kwargs["SPLIT_K"] for c in mt._TUNED.configs} == {1}
        assert len(mt._TUNED_SMALL.configs) == len(mt.TUNE_TILES) + len(mt.SPLIT_TILES)
        assert len(mt._MLP_TUNED_SMALL.configs) == len(mt.MLP_TUNE_TILES) + len(mt.MLP_SPLIT_TILES)


def test_gemm_long_split_tiles_only_for_long_reductions():
    """The GEMM's 8-slice tile (for the patch embedding's K = 3,072) is a candidate only for long
    reductions: the workspace (sized from _candidates' tiles) and the autotuner's early prune
    follow one rule, so the tuner never launches a tile the workspace cannot hold, and the TDE's
    K = 192 / 576 GEMMs keep a 3 x M x N workspace."""
    import triton

    from distilpose_kernels import mlp_triton as mt

    assert max(t.split_k for t in mt.SPLIT_TILES) > 3  # there is a long-split tile to gate
    fam = mt._GEMM._replace(tuned_small=object())  # stands for the GPU autotuner
    configs = [triton.Config(mt._gemm_config(t), num_warps=t.num_warps, num_stages=t.num_stages)
               for t in mt.TUNE_TILES + mt.SPLIT_TILES]
    for k in (24, 192, 576, 1023, 1024, 3072):
        tuned, tiles = mt._candidates(fam, None, 546, True, k)
        assert tuned is fam.tuned_small
        workspace_slices = {t.split_k for t in tiles}
        tuner_slices = {c.kwargs["SPLIT_K"] for c in mt._prune_gemm_splits(configs, {"K": k})}
        assert tuner_slices == workspace_slices, k
        assert (max(workspace_slices) > 3) == (k >= 1024), (k, workspace_slices)
    _, tiles = mt._candidates(fam, None, 546, True, None)  # no K given: every split tile
    assert {t.split_k for t in tiles} == {t.split_k for t in mt.TUNE_TILES + mt.SPLIT_TILES}
    _, tiles = mt._candidates(fam, None, mt.SPLIT_MAX_ROWS + 1, True, 3072)  # large M: no split tiles
    assert all(t.split_k == 1 for t in tiles)


@pytest.mark.parametrize("op", list(ADD_NORM_OPS))
def test_add_norm_ops_low_precision_and_mixed_dtypes(op):
    """bf16 activations with fp32 LayerNorm weights and position table (as under autocast):
    x_out and y come out in the residual's dtype."""
    fn, ref, hid = ADD_NORM_OPS[op]
    args, args64 = _add_norm_inputs(2, 13, 32, 48, 9, hid, dtype=torch.bfloat16, seed=5)
    *main, pos = args
    main[-2:] = [args64[-3].float(), args64[-2].float()]  # LayerNorm weights in fp32
    x_out, y = fn(*main, 1e-5, args64[-1].float(), backend="triton")
    want_x, want_y = ref(*[None if a is None else a.double() for a in main], 1e-5, args64[-1])
    assert x_out.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(x_out.double(), want_x, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y.double(), want_y, rtol=5e-2, atol=5e-2)
    # under autocast (fp32 tensors): the GEMM in bf16, the outputs in the residual's dtype (fp32),
    # kernel and reference alike
    f32 = [None if a is None else a.float() for a in args64]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        got = fn(*f32[:-1], 1e-5, f32[-1], backend="triton")
        want = fn(*f32[:-1], 1e-5, f32[-1], backend="reference")
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("op", list(ADD_NORM_OPS))
def test_add_norm_ops_autograd_runs_the_reference_and_compile_uses_the_op(op, monkeypatch):
    fn, ref, hid = ADD_NORM_OPS[op]
    args, _ = _add_norm_inputs(2, 7, 16, 24, 3, hid, seed=9)
    *main, pos = args
    leaves = [a.clone().requires_grad_() for a in main]
    refs = [a.clone().requires_grad_() for a in main]
    from distilpose_kernels import mlp as mm

    monkeypatch.setattr(mm, "_add_norm_kernel", lambda *a: (_ for _ in ()).throw(AssertionError("kernel with grad")))
    xo, y = fn(*leaves, 1e-5, pos, backend="triton")  # with autograd: the reference ops, not the kernel
    xr, yr = ref(*refs, 1e-5, pos)
    ((xo * 2).sum() + (y * y).sum()).backward()
    ((xr * 2).sum() + (yr * yr).sum()).backward()
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    lib = torch.ops.distilpose.fused_mlp_add_norm if hid else torch.ops.distilpose.linear_add_norm
    torch.library.opcheck(lib.default, (*main, pos[0], 1e-5, "triton"))
    torch.library.opcheck(lib.default, (*main[:-2], None, None, None, 1e-5, "reference"))
    f = torch.compile(lambda *a: fn(*a, 1e-5, pos, backend="triton"), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for a, b in zip(f(*main), ref(*main, 1e-5, pos)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nan_in_one_row_stays_in_that_row():
    """NaN policy of the row kernels: a NaN input row gives NaN in that row's outputs (GELU,
    LayerNorm), and every other row is unaffected."""
    args, _ = _mlp_inputs((2, 9), 24, 40, 24, seed=4)
    args[0][1, 3, 5] = float("nan")
    out = dk.fused_mlp(*args, backend="triton")
    bad = torch.zeros(2, 9, dtype=torch.bool, device=DEV)
    bad[1, 3] = True
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()
    torch.testing.assert_close(out[~bad], dk.fused_mlp_reference(*args)[~bad], rtol=1e-5, atol=1e-5)
    for op in ADD_NORM_OPS:
        fn, ref, hid = ADD_NORM_OPS[op]
        a, _ = _add_norm_inputs(2, 9, 24, 24, 4, hid, seed=6)
        a[0][1, 3, 5] = float("nan")
        got, want = fn(*a[:-1], 1e-5, a[-1], backend="triton"), ref(*a[:-1], 1e-5, a[-1])
        for g, w in zip(got, want):
            assert g[bad].isnan().all() and torch.isfinite(g[~bad]).all(), op
            torch.testing.assert_close(g[~bad], w[~bad], rtol=1e-5, atol=2e-5)


def test_add_norm_errors_name_the_argument():
    args, _ = _add_norm_inputs(2, 7, 16, 24, 3, seed=1)
    x, w, b, res, lw, lb, pos = args
    cases = [
        (dict(x=x[0]), ValueError, r"x: expected a 3-D \(B, L, K\) tensor"),
        (dict(residual=res[:, :5]), ValueError, "residual: expected shape"),
        (dict(norm_weight=lw[:5]), ValueError, "norm_weight: expected shape"),
        (dict(pos=pos[..., :5]), ValueError, "pos: expected shape"),
        (dict(pos=torch.randn(1, 9, 24, device=DEV)), ValueError, "pos: expected at most L=7 rows"),
        (dict(weight=w.double()), TypeError, "weight: expected dtype"),
        (dict(residual=res.long()), TypeError, "residual: expected a floating-point"),
    ]
    base = dict(x=x, weight=w, bias=b, residual=res, norm_weight=lw, norm_bias=lb, pos=pos)
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            dk.linear_add_norm(**{**base, **change})
    wide = torch.randn(mlp_mod.MLP_MAX_N + 1, 16, device=DEV)
    res_w = torch.randn(2, 7, mlp_mod.MLP_MAX_N + 1, device=DEV)
    with pytest.raises(ValueError, match="weight: backend='triton' supports at most 512 output features, got 513"):
        dk.linear_add_norm(x, wide, None, res_w, None, None, backend="triton")
    xo, y = dk.linear_add_norm(x, wide, None, res_w, None, None)  # auto: the reference
    torch.testing.assert_close(xo, res_w + F.linear(x, wide))


def test_timed_choice_records_each_decision(stub_cuda_timer, monkeypatch):
    """dk.auto_choices(): what "auto" decided, why, and the two timings (here from the stub)."""
    from distilpose_kernels import _utils

    monkeypatch.setattr(_utils, "_DECISIONS", [])
    a = torch.randn(3, 4)
    ref = _named("reference", lambda: a)
    _utils.timed_choice({}, ("k", 1), _named("fused", lambda: a.clone()), ref, torch.equal, "op1")
    stub_cuda_timer["fused"] = 3.0
    _utils.timed_choice({}, ("k", 2), _named("fused", lambda: a.clone()), ref, torch.equal, "op1")
    with pytest.warns(UserWarning):
        _utils.timed_choice({}, ("k", 3), _named("fused", lambda: a + 1), ref, torch.equal, "op2")
    with pytest.warns(UserWarning):
        _utils.timed_choice({}, ("k", 4), _named("fused", lambda: 1 / 0), ref, torch.equal, "op2")
    got = dk.auto_choices()
    assert [(d["op"], d["key"], d["use"], d["why"][:6]) for d in got] == [
        ("op1", "('k', 1)", "fused", "faster"), ("op1", "('k', 2)", "reference", "slower"),
        ("op2", "('k', 3)", "reference", "disagr"), ("op2", "('k', 4)", "reference", "failed")]
    assert got[0]["fused_ms"] == 1.0 and got[0]["reference_ms"] == 2.0 and got[2]["fused_ms"] is None
    assert "ZeroDivisionError" in got[3]["why"]


def test_timed_choice_for_cuda_graphs_times_device_time_and_caches_apart(stub_cuda_timer, monkeypatch):
    """Inside timing_for_cuda_graphs() the paths are timed with device_only=True, the decision
    is cached under (key, "device time") and recorded with timing "device"; outside, the
    per-call decision stands on its own."""
    from distilpose_kernels import _utils

    monkeypatch.setattr(_utils, "_DECISIONS", [])
    seen = []

    def timer(fn, rounds=3, reps=5, device_only=False):  # fused: slower per call, faster on device
        seen.append((fn.__name__, device_only))
        return {"fused": 1.0 if device_only else 4.0, "reference": 3.0}[fn.__name__]

    monkeypatch.setattr(_utils, "cuda_time_ms", timer)
    a = torch.randn(3, 4)
    fused, ref = _named("fused", lambda: a.clone()), _named("reference", lambda: a)
    cache = {}
    assert _utils.timed_choice(cache, ("k",), fused, ref, torch.equal, "op") is False  # per call: slower
    with dk.timing_for_cuda_graphs():
        assert _utils.timed_choice(cache, ("k",), fused, ref, torch.equal, "op") is True  # device time: faster
        assert _utils.timed_choice(cache, ("k",), fused, ref, torch.equal, "op") is True  # cached
    assert _utils.timed_choice(cache, ("k",), fused, ref, torch.equal, "op") is False  # the per-call one again
    assert cache == {("k",): False, (("k",), "device time"): True}
    assert seen == [("fused", False), ("reference", False), ("fused", True), ("reference", True)]
    assert [(d["use"], d["timing"]) for d in dk.auto_choices()] == [("reference", "call"), ("fused", "device")]
    assert not _utils._GRAPH_TIMING.get()  # the context is left as found


def test_capture_cuda_graph_warms_up_and_captures_on_device_time(monkeypatch):
    """capture_cuda_graph: ``warmup`` calls on a side stream, then the capture, all inside
    timing_for_cuda_graphs(); returns the graph and the captured call's output."""
    import contextlib

    from distilpose_kernels import _utils

    log = []

    class Stream:
        def __init__(self, device=None):
            self.name = "side"

        def wait_stream(self, other):
            log.append(("wait", self.name))

    class Graph:
        pass

    @contextlib.contextmanager
    def in_stream(stream):
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    @contextlib.contextmanager
    def capture(graph, pool=None):
        log.append(("capture", pool))
        yield

    current = Stream()
    current.name = "current"
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", in_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync",)))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)

    def fn():
        log.append(("call", _utils._GRAPH_TIMING.get()))
        return len(log)

    graph, out = dk.capture_cuda_graph(fn, warmup=2, pool="pool")
    assert isinstance(graph, Graph) and out == len(log)
    assert log == [("wait", "side"), ("enter", "side"), ("call", True), ("call", True), ("exit", "side"),
                   ("wait", "current"), ("sync",), ("capture", "pool"), ("call", True)]
    assert not _utils._GRAPH_TIMING.get()


def test_cuda_time_ms_device_only_queues_the_calls_behind_a_spin(monkeypatch):
    """device_only: every round starts with a GPU spin long enough for the host to enqueue all
    its calls, then the start event; the events measure the queued calls only."""
    from distilpose_kernels import _utils

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            self.name = "start" if sum(1 for e in log if e[0] == "event") % 2 == 0 else "end"
            log.append(("event", self.name))

        def record(self):
            log.append(("record", self.name))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    class Stream:
        def synchronize(self):
            log.append(("sync",))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", cycles)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(_utils._SPIN_CYCLES_PER_MS, 0, 1000.0)  # 1000 cycles per ms
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    assert _utils.cuda_time_ms(fn, rounds=2, reps=4, device_only=True) == 0.5
    assert len(calls) == 3 + 2 * 4  # 2 warm-ups + 1 host-timed call, then the rounds
    rounds = [i for i, e in enumerate(log) if e[0] == "sleep"]
    assert len(rounds) == 2
    for i in rounds:
        cycles = log[i][1]
        assert 50 <= cycles <= 1000 * _utils._MAX_SPIN_MS  # >= the 0.05 ms floor, <= the cap
        assert log[i + 1] == ("record", "start") and log[i + 2] == ("record", "end")  # the calls run between
    log.clear()
    assert _utils.cuda_time_ms(fn, rounds=1, reps=1) == 2.0  # per call: no spin
    assert not any(e[0] == "sleep" for e in log)


def test_timed_choice_compares_tuple_outputs(stub_cuda_timer):
    from distilpose_kernels import _utils

    a, b = torch.randn(4, 8), torch.randn(4, 8)
    agree = lambda g, r: bool(torch.equal(g, r))  # noqa: E731
    ref = _named("reference", lambda: (a, b))
    assert _utils.timed_choice({}, "k", _named("fused", lambda: (a.clone(), b.clone())), ref, agree, "t") is True
    with pytest.warns(UserWarning, match="t disagrees"):  # the second output differs
        assert _utils.timed_choice({}, "k", _named("fused", lambda: (a.clone(), b + 1)), ref, agree, "t") is False
    bad = b.clone()
    bad[0, 0] = float("inf")  # a non-finite reference output decides nothing
    cache = {}
    assert _utils.timed_choice(cache, "k", ref, _named("reference", lambda: (a, bad)), agree, "t") is False and not cache


@pytest.mark.parametrize("pos_mode", ["sine-full", "sine", "none"])
@pytest.mark.parametrize("mlp_kernel", [False, True])
def test_tde_with_add_norm_epilogues_keeps_the_outputs(pos_mode, mlp_kernel, monkeypatch):
    """TokenDistillingEncoder(fuse_add_norm): the same tokens as the plain encoder, with the
    reference ops (bit for bit) and with the Triton kernels forced."""
    from distilpose.models.tde import TokenDistillingEncoder

    torch.manual_seed(0)
    tde = TokenDistillingEncoder(8, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=32, depth=3,
                                 num_heads=2, mlp_dim=48, pos_mode=pos_mode).to(DEV).eval()
    feat = torch.randn(2, 8, 8, 6, device=DEV)
    with torch.no_grad():
        want = tde(feat)
        tde.fuse_add_norm = True
        for layer in tde.layers:
            layer.mlp.mlp_kernel = mlp_kernel
        if DEV == "cpu":
            for a, b in zip(tde(feat), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        from distilpose_kernels import mlp as mm

        for name in ("linear_add_norm", "fused_mlp_add_norm"):
            monkeypatch.setattr(dk, name, lambda *a, _f=getattr(mm, name), **k: _f(*a, **{**k, "backend": "triton"}))
        for a, b in zip(tde(feat), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp32_dot_precision_policy(monkeypatch, matmul_tf32):
    """auto: 3xTF32 on GPUs with TF32 tensor cores, FMA elsewhere; the variable overrides it;
    torch's allow_tf32 switch means plain TF32; a bad value is a clear error."""
    from distilpose_kernels import _utils

    monkeypatch.delenv(_utils.FP32_DOT_ENV, raising=False)
    matmul_tf32(False)
    monkeypatch.setattr(_utils, "_TF32_CORES", {})
    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    p = dk.fp32_dot_precision
    assert p(torch.device("cpu")) == "ieee"
    assert p(torch.device("cuda", 0)) == "tf32x3" and p(torch.device("cuda", 1)) == "ieee"
    monkeypatch.setenv(_utils.FP32_DOT_ENV, "ieee")
    assert p(torch.device("cuda", 0)) == "ieee"
    monkeypatch.setenv(_utils.FP32_DOT_ENV, " TF32x3 ")
    assert p(torch.device("cpu")) == "tf32x3" and p(torch.device("cuda", 1)) == "tf32x3"
    matmul_tf32(True)
    assert p(torch.device("cuda", 0)) == "tf32"
    monkeypatch.setenv(_utils.FP32_DOT_ENV, "fast")
    with pytest.raises(ValueError, match="DISTILPOSE_FP32_DOT: expected one of auto, ieee, tf32x3, got 'fast'"):
        p(torch.device("cpu"))


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's PRECISION, then launches."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append(kw["PRECISION"])
            return self.kernel[grid](*args, **kw)

        return launch


def test_fp32_dot_precision_reaches_the_gemm_and_attention_kernels(monkeypatch, matmul_tf32):
    from distilpose_kernels import _utils, attention_triton, mlp_triton

    seen = []
    monkeypatch.setattr(mlp_triton, "_linear_gelu_kernel", _Spy(mlp_triton._linear_gelu_kernel, seen))
    monkeypatch.setattr(attention_triton, "_RAW", {k: _Spy(f, seen) for k, f in attention_triton._RAW.items()})
    # every launch through the spied raw kernels: on a GPU the autotuners launch their own copies
    monkeypatch.setattr(attention_triton, "AUTOTUNE", False)
    monkeypatch.setattr(mlp_triton, "TILE_OVERRIDE", mlp_triton.DEFAULT_TILE)
    matmul_tf32(False)
    x = torch.randn(1, 5, 48, device=DEV, requires_grad=True)
    w = torch.randn(48, 48, device=DEV)
    for env, dtype, want in (("tf32x3", torch.float32, "tf32x3"), ("ieee", torch.float32, "ieee"),
                             ("tf32x3", torch.bfloat16, "tf32")):
        monkeypatch.setenv(_utils.FP32_DOT_ENV, env)
        seen.clear()
        xi = x.detach().to(dtype).requires_grad_()
        dk.linear(xi, w.to(dtype), backend="triton")
        dk.token_attention(torch.cat([xi] * 3, -1), 2, backend="triton").sum().backward()
        assert seen == [want] * 4, (env, dtype, seen)  # linear, attention fwd, dkdv, dq


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 as cvt.rna.tf32.f32 does: nearest, ties away, 10 mantissa bits."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("m,k,n", [(546, 192, 576), (546, 576, 192), (273, 24, 273), (273, 273, 24)])
def test_3xtf32_method_is_as_accurate_as_an_fp32_gemm(m, k, n):
    """The numerical claim behind fp32_dot_precision's default, checked on the CPU: what a
    "tf32x3" dot computes (hi*hi + hi*lo + lo*hi, hi and lo TF32; each product of two 11-bit
    mantissas is exact in fp32, so fp32 matmuls reproduce it) is within 2x of an fp32 GEMM's
    error against float64 at the TDE's shapes (batch 1 with flip: 546 tokens), while a single
    TF32 product is far outside that bound."""
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g) / k ** 0.5
    want = a.double() @ b.double()

    def err(c):
        return float((c.double() - want).abs().max())

    ah, bh = _tf32(a), _tf32(b)
    al, bl = _tf32(a - ah), _tf32(b - bh)
    assert float((a - ah - al).abs().max()) <= 2.0 ** -21 * float(a.abs().max())  # hi + lo keeps ~22 bits
    e_fp32 = err(a @ b)
    assert err(ah @ bl + al @ bh + ah @ bh) <= 2 * e_fp32
    assert err(ah @ bh) > 50 * e_fp32


def test_auto_choice_holds_fp32_dots_to_fp32_accuracy(tuner):
    """With fp32-accurate dots the kernel must match cuBLAS fp32 to 1e-5 of the output's scale;
    with TF32 dots (the user's allow_tf32) to 1e-3."""
    _, good = tuner
    off = _named("fused", lambda: good + 1e-4 * good.abs().max())
    ref = _named("reference", lambda: good.clone())
    assert mlp_mod._choose((False, 8, 16, 16, torch.float32, None, "tf32"), off, ref) is True
    with pytest.warns(UserWarning, match="linear: the Triton kernel disagrees"):
        assert mlp_mod._choose((False, 8, 16, 16, torch.float32, None, "tf32x3"), off, ref, "linear") is False


def test_auto_choice_with_16bit_operands_allows_16bit_rounding_in_fp32_outputs(tuner):
    """bf16 operands with float32 outputs (the add + LayerNorm epilogues under autocast, whose
    reference rounds the GEMM to bf16 before the float32 add): a bf16-sized difference agrees;
    a larger one still does not."""
    _, good = tuner
    near = _named("fused", lambda: good + 4e-3 * good.abs().max())  # ~ one bf16 rounding
    far = _named("fused", lambda: good + 5e-2 * good.abs().max())
    ref = _named("reference", lambda: good.clone())
    assert mlp_mod._choose(("add_norm", 8, 16, 16, False, torch.bfloat16, None, "16bit"), near, ref) is True
    with pytest.warns(UserWarning, match="disagrees"):
        assert mlp_mod._choose(("add_norm", 8, 16, 32, False, torch.bfloat16, None, "16bit"), far, ref) is False
    with pytest.warns(UserWarning, match="disagrees"):  # float32 operands keep the float32 bound
        assert mlp_mod._choose(("add_norm", 8, 16, 16, False, torch.float32, None, "tf32"), near, ref) is False


def test_tde_mlp_kernel_flag_keeps_outputs_and_gradients(monkeypatch):
    """Mlp with ``mlp_kernel``: the whole MLP through distilpose_kernels.fused_mlp (forced onto
    the Triton kernel here), values and gradients as the plain module's."""
    from distilpose.models.tde import Mlp

    calls = []

    def spy(x, w1, b1, w2, b2, backend=None):
        calls.append((tuple(w1.shape), tuple(w2.shape)))
        return mlp_mod.fused_mlp(x, w1, b1, w2, b2, backend="triton")

    torch.manual_seed(0)
    m = Mlp(24, 40).to(DEV)
    x = torch.randn(2, 9, 24, device=DEV, requires_grad=True)
    a = m(x)
    ga = torch.autograd.grad(a.square().sum(), (x, m.fc1.weight, m.fc2.bias))
    monkeypatch.setattr(dk, "fused_mlp", spy)
    m.mlp_kernel = True
    b = m(x)
    gb = torch.autograd.grad(b.square().sum(), (x, m.fc1.weight, m.fc2.bias))
    assert calls == [((40, 24), (24, 40))]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


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


def test_tde_layer_with_triton_linears_keeps_outputs_and_gradients(monkeypatch):
    """TransformerLayer with ``triton_linears``: qkv, proj, fc1 and fc2 go through
    distilpose_kernels.linear (forced onto the Triton kernel here), values and gradients as the
    plain layer's."""
    from distilpose.models.tde import TransformerLayer

    calls = []

    def spy(x, w, b=None, backend=None):
        calls.append(tuple(w.shape))
        return mlp_mod.linear(x, w, b, backend="triton")

    torch.manual_seed(0)
    layer = TransformerLayer(48, 2, 72).to(DEV)
    x = torch.randn(2, 11, 48, device=DEV, requires_grad=True)
    want = layer(x)
    gw = torch.autograd.grad(want.square().sum(), (x, layer.attn.qkv.weight, layer.mlp.fc2.bias))
    monkeypatch.setattr(dk, "linear", spy)
    layer.attn.triton_linears = layer.mlp.triton_linears = True
    got = layer(x)
    gg = torch.autograd.grad(got.square().sum(), (x, layer.attn.qkv.weight, layer.mlp.fc2.bias))
    assert sorted(calls) == sorted([(144, 48), (48, 48), (72, 48), (48, 72)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for u, v in zip(gw, gg):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4)


_AOT = r"""
import distilpose_kernels.mlp_triton as mt

# the GPU autotuners key on argument names that exist (a typo would be ignored silently)
for tuner in (mt._TUNED, mt._TUNED_SMALL, mt._ADD_NORM_TUNED, mt._ADD_NORM_TUNED_SMALL, mt._MLP_TUNED,
              mt._MLP_TUNED_SMALL):
    assert set(tuner.keys) <= set(tuner.arg_names), (tuner.keys, tuner.arg_names)

ptrs = lambda p, names: {n: p for n in names}  # noqa: E731
# every tile in bf16; the first tile also in fp32 with FMA and with 3xTF32 dots
VARIANTS = lambda tiles: [(t, "*bf16", "tf32") for t in tiles] + [(tiles[0], "*fp32", pr) for pr in ("ieee", "tf32x3")]  # noqa: E731
for t, p, prec in VARIANTS(mt.MLP_TUNE_TILES) + VARIANTS(mt.MLP_SPLIT_TILES):
    for add_norm in (False, True):
        consts = dict(HAS_B1=True, HAS_B2=True, ADD_NORM=add_norm, HAS_POS=add_norm, HAS_W=add_norm,
                      HAS_B=add_norm, PRECISION=prec, UPCAST=False, BLOCK_K=64, BLOCK_N=256, **mt._mlp_config(t))
        compile_(mt._mlp_kernel, ptrs(p, ("X", "W1", "B1", "W2", "B2", "Y", "RES", "POS", "LNW", "LNB", "XO")),
                 dict(eps="fp32", WS="*fp32", CNT="*i32"), consts, num_warps=t.num_warps, num_stages=t.num_stages)
for t, p, prec in VARIANTS(mt.ADD_NORM_TUNE_TILES) + VARIANTS(mt.ADD_NORM_SPLIT_TILES):
    consts = dict(HAS_BIAS=True, HAS_POS=True, HAS_W=True, HAS_B=True, PRECISION=prec, UPCAST=False, BLOCK_N=256,
                  **mt._add_norm_config(t))
    compile_(mt._linear_add_norm_kernel, ptrs(p, ("X", "Wt", "B", "RES", "POS", "LNW", "LNB", "XO", "Y")),
             dict(eps="fp32", WS="*fp32", CNT="*i32"), consts, num_warps=t.num_warps, num_stages=t.num_stages)
for t, p, prec in VARIANTS((mt.DEFAULT_TILE, *mt.TUNE_TILES)) + VARIANTS(mt.SPLIT_TILES):
    for gelu in (True, False):
        consts = dict(HAS_B=True, GELU=gelu, PRECISION=prec, UPCAST=False, GROUP_M=8, **mt._gemm_config(t))
        compile_(mt._linear_gelu_kernel, dict(X=p, Wt=p, B=p, Y=p, WS="*fp32", CNT="*i32"), {}, consts,
                 num_warps=t.num_warps, num_stages=t.num_stages)
"""


@pytest.mark.slow
def test_linear_gelu_kernel_compiles_for_sm90_without_a_gpu():
    """Every tile the GPU may autotune (GEMM with and without the GELU, whole MLP with and without
    the add + LayerNorm epilogue, GEMM + add + LayerNorm) in bf16, and one tile of each in fp32 with
    FMA and with 3xTF32 dots, at the TDE's output width (192, padded to 256)."""
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


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(546, 192, 576), (546, 192, 192), (546, 576, 192), (17472, 192, 576)])
def test_gpu_linear_fp32_dots_are_as_accurate_as_cublas(m, k, n, monkeypatch, matmul_tf32):
    """Both fp32 dot precisions of the GEMM (FMA and 3xTF32) against float64, held to 2x the
    error of cuBLAS fp32 (TF32 off) on the same inputs; and "auto" picks without a warning."""
    from distilpose_kernels import _utils

    matmul_tf32(False)
    (x, w, b), (x64, w64, b64) = _inputs((m,), k, n, seed=m + n)
    want = F.linear(x64, w64, b64)
    floor = 4 * torch.finfo(torch.float32).eps * float(want.abs().max())
    e_cublas = float((F.linear(x, w, b).double() - want).abs().max())
    for prec in ("ieee", "tf32x3"):
        monkeypatch.setenv(_utils.FP32_DOT_ENV, prec)
        for backend in ("triton", None):
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="linear")
                got = dk.linear(x, w, b, backend=backend)
            e = float((got.double() - want).abs().max())
            assert e <= max(2 * e_cublas, floor), (prec, backend, e, e_cublas)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dtype", [(256, torch.bfloat16), (2, torch.float32), (1, torch.float16)])
def test_gpu_fused_mlp_tde_shapes(batch, dtype):
    """The TDE's MLP (192 -> 576 -> 192, 273 tokens): the kernel and "auto" against float64, held
    to twice the error of cuBLAS + GELU + cuBLAS on the same inputs."""
    args, args64 = _mlp_inputs((batch, 273), 192, 576, 192, dtype=dtype, seed=batch)
    want = dk.fused_mlp_reference(*[a.double() for a in args])
    e_ref = float((dk.fused_mlp_reference(*args).double() - want).abs().max())
    floor = 4 * torch.finfo(dtype).eps * float(want.abs().max())
    for backend in ("triton", None):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fused_mlp")
            got = dk.fused_mlp(*args, backend=backend)
        e = float((got.double() - want).abs().max())
        assert e <= max(2 * e_ref, floor), (backend, e, e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(ADD_NORM_OPS))
@pytest.mark.parametrize("batch,dtype", [(256, torch.bfloat16), (2, torch.float32)])
def test_gpu_add_norm_tde_shapes(op, batch, dtype):
    """The TDE's proj / MLP + residual + position re-add + LayerNorm (273 tokens, pos on the last
    256): the kernel and "auto" against float64, within twice the eager ops' error."""
    fn, ref, hid = ADD_NORM_OPS[op]
    args, _ = _add_norm_inputs(batch, 273, 192, 192, 256, 576 if hid else None, dtype=dtype, seed=batch)
    *main, pos = args
    want = ref(*[None if a is None else a.double() for a in main], 1e-5, pos.double())
    eager = ref(*main, 1e-5, pos)
    for backend in ("triton", None):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*add_norm")
            got = fn(*main, 1e-5, pos, backend=backend)
        for name, g, e, w in zip(("x_out", "y"), got, eager, want):
            err, err_e = float((g.double() - w).abs().max()), float((e.double() - w).abs().max())
            floor = 4 * torch.finfo(dtype).eps * float(w.abs().max())
            assert err <= max(2 * err_e, floor), (op, backend, name, err, err_e)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [192, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_add_norm_split_tiles_tde_batch1(k, dtype, monkeypatch):
    """Every split tile at the TDE's batch-1 flip shape (546 rows: proj K = 192, fc2 K = 576)
    against float64 within twice the eager ops' error, and the same bits in repeated calls (the
    last program of a row block sums the partials in slice order, whoever it is)."""
    from distilpose_kernels import mlp_triton as mt

    args, _ = _add_norm_inputs(2, 273, k, 192, 256, dtype=dtype, seed=k)
    *main, pos = args
    want = dk.linear_add_norm_reference(*[None if a is None else a.double() for a in main], 1e-5, pos.double())
    eager = dk.linear_add_norm_reference(*main, 1e-5, pos)
    for tile in mt.ADD_NORM_SPLIT_TILES:
        monkeypatch.setattr(mt, "ADD_NORM_TILE_OVERRIDE", tile)
        got = dk.linear_add_norm(*main, 1e-5, pos, backend="triton")
        for _ in range(3):
            again = dk.linear_add_norm(*main, 1e-5, pos, backend="triton")
            assert all(torch.equal(a, g) for a, g in zip(again, got)), tile
        for name, g, e, w in zip(("x_out", "y"), got, eager, want):
            err, err_e = float((g.double() - w).abs().max()), float((e.double() - w).abs().max())
            floor = 4 * torch.finfo(dtype).eps * float(w.abs().max())
            assert err <= max(2 * err_e, floor), (tile, name, err, err_e)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(192, 576), (576, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_split_k_tiles_tde_batch1(k, n, dtype, monkeypatch, matmul_tf32):
    """Every split-K tile of linear / linear_gelu at the TDE's batch-1 flip shapes (546 rows: qkv /
    fc1 K = 192, fc2 K = 576) against float64 within twice cuBLAS's error, the same bits in
    repeated calls."""
    from distilpose_kernels import mlp_triton as mt

    matmul_tf32(False)
    (x, w, b), (x64, w64, b64) = _inputs((546,), k, n, dtype=dtype, seed=k)
    for op, (fn, ref) in OPS.items():
        want = ref(x64, w64, b64)
        e_ref = float((ref(x, w, b).double() - want).abs().max())
        floor = 4 * torch.finfo(dtype).eps * float(want.abs().max())
        for tile in mt.SPLIT_TILES:
            monkeypatch.setattr(mt, "TILE_OVERRIDE", tile)
            got = fn(x, w, b, backend="triton")
            for _ in range(3):
                assert torch.equal(fn(x, w, b, backend="triton"), got), (op, tile)
            e = float((got.double() - want).abs().max())
            assert e <= max(2 * e_ref, floor), (op, tile, e, e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("add_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_mlp_split_tiles_tde_batch1(add_norm, dtype, monkeypatch):
    """Every split tile of the whole-MLP kernel at the TDE's batch-1 flip shape (546 rows,
    192 -> 576 -> 192, pos on the last 256 tokens) against float64 within twice the eager ops'
    error, and the same bits in repeated calls."""
    from distilpose_kernels import mlp_triton as mt

    args, _ = _add_norm_inputs(2, 273, 192, 192, 256, 576, dtype=dtype, seed=7)
    *main, pos = args
    main64 = [None if a is None else a.double() for a in main]
    if add_norm:
        fn = lambda: dk.fused_mlp_add_norm(*main, 1e-5, pos, backend="triton")  # noqa: E731
        want = dk.fused_mlp_add_norm_reference(*main64, 1e-5, pos.double())
        eager = dk.fused_mlp_add_norm_reference(*main, 1e-5, pos)
    else:
        fn = lambda: (dk.fused_mlp(*main[:5], backend="triton"),)  # noqa: E731
        want, eager = (dk.fused_mlp_reference(*main64[:5]),), (dk.fused_mlp_reference(*main[:5]),)
    for tile in mt.MLP_SPLIT_TILES:
        monkeypatch.setattr(mt, "MLP_TILE_OVERRIDE", tile)
        got = fn()
        for _ in range(3):
            assert all(torch.equal(a, g) for a, g in zip(fn(), got)), tile
        for g, e, w in zip(got, eager, want):
            err, err_e = float((g.double() - w).abs().max()), float((e.double() - w).abs().max())
            floor = 4 * torch.finfo(dtype).eps * float(w.abs().max())
            assert err <= max(2 * err_e, floor), (tile, err, err_e)


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


def test_tuned_configs_reports_the_autotuners_picks(monkeypatch):
    """dk.tuned_configs(): per autotuner (module attributes, and dicts of them as attention's),
    the tile picked for each key, as text; nothing for tuners that have not tuned."""
    from distilpose_kernels import mlp_triton as mt

    class FakeTuner:
        configs = ["a", "b"]

        def __init__(self, cache):
            self.cache = cache

    monkeypatch.setattr(mt, "_FAKE_TUNER", FakeTuner({(546, 192, "fp32"): "BLOCK_M: 32, SPLIT_K: 3"}), raising=False)
    monkeypatch.setattr(mt, "_FAKE_TUNERS", {"fwd": FakeTuner({(273,): "BLOCK_M: 16"}), "dq": FakeTuner({})},
                        raising=False)
    got = dk.tuned_configs()
    assert got["mlp_triton._FAKE_TUNER"] == {"(546, 192, 'fp32')": "BLOCK_M: 32, SPLIT_K: 3"}
    assert got["mlp_triton._FAKE_TUNERS[fwd]"] == {"(273,)": "BLOCK_M: 16"}
    assert "mlp_triton._FAKE_TUNERS[dq]" not in got
