"""qkv_attention: the qkv projection inside the attention kernel (inference), Triton kernel under
the CPU interpreter vs float64 references; its dispatch, gradient fallback and errors.
Shapes are small: the interpreter is slow."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distilpose_kernels as dk
from distilpose_kernels import attention as attn_mod

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter


def _at():
    from distilpose_kernels import attention_triton

    return attention_triton


def _inputs(n, L, h, d, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = h * d
    x = torch.randn(n, L, c, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(3 * c, c, generator=g, dtype=torch.float64) * c ** -0.5 * 1.5).to(dtype)
    b = (torch.randn(3 * c, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    return x, w, b


def _ref64(x, w, b, h, scale=None):
    b64 = None if b is None else b.double()
    return dk.token_attention_reference(F.linear(x.double(), w.double(), b64), h, scale)


@pytest.mark.parametrize("n,L,h,d,bias", [
    (1, 17, 2, 16, False),   # L under one block
    (2, 37, 4, 24, True),    # head dim 24 (padded to 32), L not a multiple of the blocks, bias
    (1, 70, 2, 24, False),   # several key and query blocks
    (3, 5, 1, 8, True),      # one head, head dim under 16
])
def test_qkv_attention_matches_float64(n, L, h, d, bias):
    x, w, b = _inputs(n, L, h, d, bias, seed=n * 100 + L)
    got = dk.qkv_attention(x, w, h, bias=b, backend="triton")
    want = _ref64(x, w, b, h)
    assert got.dtype == x.dtype and got.shape == (n, L, h * d)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # the same as the two ops it replaces
    two = dk.token_attention(F.linear(x, w, b), h, backend="triton")
    torch.testing.assert_close(got, two, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", range(10))
def test_qkv_attention_every_config(config, monkeypatch):
    """Each autotune candidate (forced), at a shape with several query and key blocks."""
    at = _at()
    monkeypatch.setattr(at, "QKV_ATTN_OVERRIDE", at.QKV_ATTN_CONFIGS[config])
    x, w, b = _inputs(2, 41, 2, 24, True, seed=config)
    got = dk.qkv_attention(x, w, 2, scale=0.3, bias=b, backend="triton")
    torch.testing.assert_close(got.double(), _ref64(x, w, b, 2, 0.3), atol=2e-5, rtol=2e-5)


def test_qkv_attention_strided_inputs_and_bf16(monkeypatch):
    """x and weight through their strides (a transposed view, a column slice); bf16 within
    bf16 rounding of float64 (q, k, v rounded to bf16 as the two-op path stores them)."""
    x, w, _ = _inputs(2, 23, 2, 24, seed=3)
    xs = torch.cat((x, torch.randn_like(x)), dim=-1)[..., : x.shape[-1]]  # non-contiguous rows
    wt = w.t().contiguous().t()  # column-major weight
    assert not xs.is_contiguous() and not wt.is_contiguous()
    got = dk.qkv_attention(xs, wt, 2, backend="triton")
    torch.testing.assert_close(got.double(), _ref64(x, w, None, 2), atol=2e-5, rtol=2e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    got16 = dk.qkv_attention(xb, wb, 2, backend="triton")
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), _ref64(xb, wb, None, 2), atol=3e-2, rtol=3e-2)


def test_qkv_attention_output_fully_written(monkeypatch):
    """The output buffer starts as NaN: every element is written."""
    at = _at()
    monkeypatch.setattr(at, "_new_output", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                   device=device, dtype=dtype))
    x, w, _ = _inputs(1, 19, 2, 24, seed=5)
    got = dk.qkv_attention(x, w, 2, backend="triton")
    assert torch.isfinite(got).all()


def test_qkv_attention_gradients_take_the_two_ops(monkeypatch):
    """With a gradient needed the kernel (forward only) is not used: the two ops run and the
    gradients equal float64's."""
    at = _at()
    monkeypatch.setattr(at, "qkv_attention_forward", lambda *a, **k: pytest.fail("fused kernel used with grad"))
    x, w, b = _inputs(1, 13, 2, 16, True, seed=7)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = dk.qkv_attention(leaves[0], leaves[1], 2, bias=leaves[2], backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    l64 = [t.double().requires_grad_() for t in (x, w, b)]
    want = dk.token_attention_reference(F.linear(l64[0], l64[1], l64[2]), 2)
    grads64 = torch.autograd.grad(want, l64, dout.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=2e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=5e-5, rtol=5e-5)
    with torch.no_grad():  # no gradient needed: the kernel
        monkeypatch.undo()
        calls = []
        real = at.qkv_attention_forward
        monkeypatch.setattr(at, "qkv_attention_forward", lambda *a: calls.append(1) or real(*a))
        dk.qkv_attention(leaves[0], leaves[1], 2, bias=leaves[2], backend="triton")
        assert calls


def test_qkv_attention_dispatch_on_cpu(monkeypatch):
    """"auto" on CPU tensors is the reference (no Triton, no timing)."""
    monkeypatch.setattr(attn_mod, "_triton_module", lambda: pytest.fail("Triton on CPU auto"))
    monkeypatch.setattr(attn_mod, "timed_choice", lambda *a, **k: pytest.fail("timed on the CPU"))
    x, w, b = _inputs(1, 9, 2, 8, True)
    got = dk.qkv_attention(x, w, 2, bias=b)
    torch.testing.assert_close(got.double(), _ref64(x, w, b, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk.qkv_attention_reference(x, w, 2, None, b), got)


def test_qkv_attention_errors_name_the_argument():
    x, w, b = _inputs(1, 9, 2, 8, True)
    with pytest.raises(ValueError, match="weight"):
        dk.qkv_attention(x, w[:-1], 2)
    with pytest.raises(ValueError, match="bias"):
        dk.qkv_attention(x, w, 2, bias=b[:5])
    with pytest.raises(ValueError, match="num_heads: 3 does not divide"):
        dk.qkv_attention(x, w, 3)
    with pytest.raises(ValueError, match="num_heads: expected a positive int"):
        dk.qkv_attention(x, w, 0)
    with pytest.raises(ValueError, match="x"):
        dk.qkv_attention(x[0], w, 2)
    with pytest.raises(TypeError, match="x: backend='triton' does not support weight / bias of dtype"):
        dk.qkv_attention(x, w.double(), 2, backend="triton")
    with pytest.raises(TypeError, match="x: backend='triton' does not support dtype torch.float64"):
        dk.qkv_attention(x.double(), w.double(), 2, backend="triton")
    with torch.enable_grad():  # "auto" on CPU: the reference
        xw, ww, _ = _inputs(1, 5, 1, 80)
        torch.testing.assert_close(dk.qkv_attention(xw, ww, 1), dk.qkv_attention_reference(xw, ww, 1))


def test_qkv_attention_wide_heads_run_the_two_triton_ops(monkeypatch):
    """Head dim 80 (over the fused kernel's 64, within token_attention's Triton kernels): backend
    "triton" runs linear + token_attention on Triton instead of failing, so a model with wide
    heads still runs with the engine's attention_backend="triton"."""
    monkeypatch.setattr(_at(), "qkv_attention_forward", lambda *a: pytest.fail("the fused kernel ran"))
    seen = []
    real = attn_mod.token_attention
    monkeypatch.setattr(attn_mod, "token_attention", lambda *a, **k: seen.append(k.get("backend")) or real(*a, **k))
    x, w, b = _inputs(1, 5, 1, 80, True)
    got = dk.qkv_attention(x, w, 1, bias=b, backend="triton")
    assert seen == ["triton"]
    torch.testing.assert_close(got.double(), _ref64(x, w, b, 1), atol=2e-5, rtol=2e-5)


def test_qkv_attention_auto_empty_and_under_compile(monkeypatch, stub_cuda_timer):
    """"auto" on the kernel's path: an empty input is not timed (comparing empty outputs would
    fail and cache a false "failed"); while torch.compile traces, nothing can be timed and the
    two ops run."""
    monkeypatch.setattr(attn_mod, "select_triton_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(attn_mod, "_QKV_CHOICES", {})
    monkeypatch.setattr(attn_mod, "timed_choice", lambda *a, **k: pytest.fail("timed"))
    x, w, _ = _inputs(1, 5, 2, 8)
    assert dk.qkv_attention(x[:0], w, 2).shape == (0, 5, 16)
    assert dk.qkv_attention(x[:, :0], w, 2).shape == (1, 0, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    two_ops = []
    monkeypatch.setattr(attn_mod, "_qkv_two_ops", lambda *a: two_ops.append(a[-1]) or "two ops")
    assert dk.qkv_attention(x, w, 2) == "two ops" and two_ops == [None]


_SM90_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, "tools")
from gemm_resources import _compile
from kernel_resources import resources
import distilpose_kernels.attention_triton as at
rows = []
for ptr, prec in (("*fp32", "tf32x3"), ("*fp32", "ieee"), ("*bf16", "tf32")):
    for cfg in at.QKV_ATTN_CONFIGS:
        if not at.qkv_attn_config_ok(cfg, prec):
            continue
        bm, bn, bc, w, s = cfg
        k = _compile(at._qkv_attn_fwd_kernel, ptr, {"X", "Wt", "Bias", "Out"}, {"qk_scale": "fp32"},
                     dict(HAS_BIAS=False, HEAD_DIM=24, BLOCK_D=32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, PRECISION=prec,
                          UPCAST=False), w, s, dict(C=192, L=273, H=8, NH=16))
        r = resources(k.asm["cubin"])
        rows.append(dict(ptr=ptr, prec=prec, cfg=cfg, regs=r["regs"], stack=r["stack"], shared=k.metadata.shared))
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_qkv_attention_configs_compile_for_sm90_without_spills():
    """Every autotune candidate a precision keeps compiles for sm_90 at the TDE's shape (C = 192,
    head dim 24) without register spills: no stack frame with fp32 3xTF32 dots (the GPU default)
    and bf16; fp32 FMA dots (the one-stage tiles) at most a small frame well under the register
    limit."""
    import json
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists() and shutil.which("cuobjdump") is None:
        pytest.skip("cuobjdump not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.split("ROWS", 1)[1])
    at = _at()
    one_stage = [c for c in at.QKV_ATTN_CONFIGS if c[4] == 1]
    assert len(rows) == 2 * len(one_stage) + len(at.QKV_ATTN_CONFIGS) > len(at.QKV_ATTN_CONFIGS) + 2 * 6
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["shared"] <= 227 * 1024, row
        if row["prec"] == "ieee":  # FMA dots (pre-sm_80 GPUs, or forced): an 8-16 byte frame at under 200 registers
            assert row["stack"] <= 16 and row["regs"] < 200, row  # is not register pressure
        else:
            assert row["stack"] == 0, row


def test_engine_with_the_fused_qkv_attention_kernel_matches_the_two_ops():
    """An engine whose TDE runs the fused kernel (attention backend "triton": the kernel under the
    interpreter) gives the keypoints of one that runs the qkv Linear + attention kernel."""
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    torch.manual_seed(0)
    model = build_model("distilpose_tiny").eval()
    crops = torch.randn(1, 3, *model.input_size)
    calls = []
    at = _at()
    real = at.qkv_attention_forward
    fused = InferenceEngine(model, attention_backend="triton", flip_test=False)
    two = InferenceEngine(model, attention_backend="triton", flip_test=False, fuse_qkv=False)
    import unittest.mock as mock

    with mock.patch.object(at, "qkv_attention_forward", lambda *a: calls.append(1) or real(*a)):
        a = fused(crops)
        n_fused = len(calls)
        b = two(crops)
    assert n_fused == len(model.tde.layers) and len(calls) == n_fused  # one per layer, none in the other
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3)


def test_qkv_attention_prune_keeps_fp32_accurate_dots_on_one_stage():
    """The autotuner's prune: fp32-accurate dots (3xTF32, FMA) time only the one-stage tiles (two
    stages spilled); 16-bit / TF32 dots time all; blocks much larger than L are dropped."""
    at = _at()
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
               for bm, bn, bc, w, s in at.QKV_ATTN_CONFIGS]
    for prec, stages in (("tf32x3", {1}), ("ieee", {1}), ("tf32", {1, 2})):
        kept = at._qkv_attn_prune(configs, {"L": 273}, PRECISION=prec)
        assert {c.num_stages for c in kept} == stages, prec
    small = at._qkv_attn_prune(configs, {"L": 9}, PRECISION="tf32")
    assert all(c.kwargs["BLOCK_M"] <= 16 and c.kwargs["BLOCK_N"] <= 32 for c in small) and small


def test_qkv_attention_opcheck():
    x, w, b = _inputs(1, 9, 2, 16, True)
    torch.library.opcheck(torch.ops.distilpose.qkv_attention_fwd.default, (x, w, b, 2, 0.25))
    torch.library.opcheck(torch.ops.distilpose.qkv_attention_fwd.default, (x, w, None, 2, 0.25))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_qkv_attention_matches_and_auto_decides(dtype, monkeypatch):
    """On the GPU (autotuned tiles): the kernel against float64 at the TDE's batch-1 flip shape
    (2 x 273 tokens, 8 heads of 24), each autotune candidate too; "auto" decides once and
    agrees with the two ops."""
    at = _at()
    x, w, _ = _inputs(2, 273, 8, 24, dtype=dtype, seed=11)
    x, w = x.cuda(), w.cuda()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        want = _ref64(x, w, None, 8)
        got = dk.qkv_attention(x, w, 8, backend="triton")
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        for cfg in at.QKV_ATTN_CONFIGS:
            monkeypatch.setattr(at, "QKV_ATTN_OVERRIDE", cfg)
            torch.testing.assert_close(dk.qkv_attention(x, w, 8, backend="triton").double(), want, atol=tol, rtol=tol,
                                       msg=lambda m: f"{cfg}: {m}")
        monkeypatch.setattr(at, "QKV_ATTN_OVERRIDE", None)
        monkeypatch.setattr(attn_mod, "_QKV_CHOICES", {})
        n0 = len(dk.auto_choices())
        a = dk.qkv_attention(x, w, 8)
        b = dk.qkv_attention(x, w, 8)
        made = [d for d in dk.auto_choices()[n0:] if d["op"].startswith("qkv_attention")]
        assert len(made) == 1 and made[0]["why"] in ("faster", "slower"), made
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.double(), want, atol=tol, rtol=tol)
