"""Token attention and add-position+LayerNorm: Triton kernels (CPU interpreter) vs float64 references.

Every Triton test passes backend="triton" explicitly so the kernels run on the CPU under
TRITON_INTERPRET=1 (set by conftest.py). Shapes are small: the interpreter is slow.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import distilpose_kernels as dk
from sm90 import compile_for_sm90
from distilpose_kernels import attention as attn_mod

triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _at():
    from distilpose_kernels import attention_triton

    return attention_triton


def _rand_qkv(n, L, h, d, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, 3 * h * d, generator=g, dtype=torch.float64).mul_(1.5).to(device=device, dtype=dtype)


def _ref_fwd_bwd(qkv, h, dout, scale=None):
    """float64 reference output and dqkv for the given (low-precision) inputs."""
    q64 = qkv.detach().to(torch.float64).requires_grad_()
    out = dk.token_attention_reference(q64, h, scale)
    (g,) = torch.autograd.grad(out, q64, dout.to(torch.float64))
    return out.detach(), g


def _triton_fwd_bwd(qkv, h, dout, scale=None):
    x = qkv.detach().clone().requires_grad_()
    out = dk.token_attention(x, h, scale, backend="triton")
    (g,) = torch.autograd.grad(out, x, dout)
    return out.detach(), g


def _check_close(name, got, want, atol, rtol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.to(torch.float64), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- attention, fp32


@pytest.mark.parametrize(
    "n,L,h,d",
    [
        (2, 17, 2, 24),  # the TDE's 17 keypoint tokens, head dim 24
        (1, 1, 1, 24),  # L=1
        (1, 273, 1, 24),  # the TDE's full sequence (17 + 256), not a multiple of any block
        (2, 40, 3, 16),
        (1, 33, 2, 32),
        (1, 20, 1, 64),
        (1, 9, 1, 128),
        (1, 11, 2, 20),  # non-power-of-two head dim below 24
    ],
)
def test_forward_backward_fp32_vs_float64(n, L, h, d):
    qkv = _rand_qkv(n, L, h, d, seed=L * 7 + d)
    dout = torch.randn(n, L, h * d, dtype=torch.float32, device=DEV)
    out, g = _triton_fwd_bwd(qkv, h, dout)
    out_ref, g_ref = _ref_fwd_bwd(qkv, h, dout)
    _check_close("out", out, out_ref, 2e-5, 1e-4)
    c = h * d
    for i, part in enumerate("qkv"):
        _check_close(f"d{part}", g[..., i * c:(i + 1) * c], g_ref[..., i * c:(i + 1) * c], 5e-5, 1e-4)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_several_blocks_with_partial_tail(monkeypatch, blocks):
    """Force small tiles so L=45 spans several query and key blocks, the last one partial."""
    monkeypatch.setattr(_at(), "BLOCK_OVERRIDE", blocks)
    qkv = _rand_qkv(2, 45, 2, 24, seed=3)
    dout = torch.randn(2, 45, 48, device=DEV)
    out, g = _triton_fwd_bwd(qkv, 2, dout, scale=0.3)
    out_ref, g_ref = _ref_fwd_bwd(qkv, 2, dout, scale=0.3)
    _check_close("out", out, out_ref, 2e-5, 1e-4)
    _check_close("dqkv", g, g_ref, 5e-5, 1e-4)


@pytest.mark.parametrize("blocks", [(16, 16, 2), (32, 16, 3), (16, 32, 4)])
def test_split_key_forward_matches_float64(monkeypatch, blocks):
    """The split-key forward (keys in slices; the last program of each query block merges the
    slices' max / sum / accumulator) against float64: the output, the log-sum-exp (the backward
    reads it) and the gradients. L=45 in 2-4 slices: with 32-key steps a slice may be empty. The
    counters are relaunched on one shared buffer, which the kernel leaves at zero."""
    at = _at()
    monkeypatch.setattr(at, "BLOCK_OVERRIDE", blocks)
    shared = torch.zeros(64, dtype=torch.int32, device=DEV)
    monkeypatch.setattr(at, "_new_counts", lambda n, device: shared[:n])
    qkv = _rand_qkv(2, 45, 2, 24, seed=4)
    dout = torch.randn(2, 45, 48, device=DEV)
    out, g = _triton_fwd_bwd(qkv, 2, dout, scale=0.3)
    assert not shared.any()
    out_ref, g_ref = _ref_fwd_bwd(qkv, 2, dout, scale=0.3)
    _check_close("out", out, out_ref, 2e-5, 1e-4)
    _check_close("dqkv", g, g_ref, 5e-5, 1e-4)
    o2, lse = at.attention_forward(qkv.detach().float(), 2, 0.3)
    assert not shared.any() and torch.equal(o2, out)
    q, k, v = qkv.detach().double().reshape(2, 45, 3, 2, 24).permute(2, 0, 3, 1, 4)
    want_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.3, dim=-1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_batch1_wide_key_block_forward_matches_float64(monkeypatch):
    """The (16, 128) small-launch config at the TDE's L = 273 (3 key steps, the last partial):
    output and gradients against float64."""
    monkeypatch.setattr(_at(), "BLOCK_OVERRIDE", (16, 128, 1))
    qkv = _rand_qkv(1, 273, 2, 24, seed=7)
    dout = torch.randn(1, 273, 48, device=DEV)
    out, g = _triton_fwd_bwd(qkv, 2, dout, scale=24 ** -0.5)
    out_ref, g_ref = _ref_fwd_bwd(qkv, 2, dout, scale=24 ** -0.5)
    _check_close("out", out, out_ref, 2e-5, 1e-4)
    _check_close("dqkv", g, g_ref, 5e-5, 1e-4)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 4, (1,), generator=g))
    L = int(torch.randint(1, 80, (1,), generator=g))
    h = int(torch.randint(1, 4, (1,), generator=g))
    d = [16, 20, 24, 32, 48][int(torch.randint(0, 5, (1,), generator=g))]
    scale = float(torch.empty(1).uniform_(0.05, 0.5, generator=g))
    qkv = _rand_qkv(n, L, h, d, seed=seed)
    dout = torch.randn(n, L, h * d, generator=g).to(DEV)
    out, gq = _triton_fwd_bwd(qkv, h, dout, scale)
    out_ref, g_ref = _ref_fwd_bwd(qkv, h, dout, scale)
    _check_close(f"out {(n, L, h, d)}", out, out_ref, 2e-5, 1e-4)
    _check_close(f"dqkv {(n, L, h, d)}", gq, g_ref, 5e-5, 1e-4)


def test_strided_input_and_expanded_grad():
    """qkv read through non-contiguous strides; dout with zero strides (from .sum())."""
    big = _rand_qkv(2, 19, 2, 24 + 8, seed=5)  # (2, 19, 192): take a strided window of it
    qkv = big[:, :, :144]
    assert not qkv.is_contiguous()
    x = big.detach().clone()[:, :, :144].requires_grad_()
    out = dk.token_attention(x, 2, backend="triton")
    out.sum().backward()  # the incoming gradient is an expanded (stride-0) tensor
    out_ref, g_ref = _ref_fwd_bwd(qkv, 2, torch.ones(2, 19, 48, device=DEV))
    _check_close("out", out.detach(), out_ref, 2e-5, 1e-4)
    _check_close("dqkv", x.grad, g_ref, 5e-5, 1e-4)


def test_lse_output_and_its_gradient():
    """The fwd op's second output is the natural-log LSE of the scaled scores and is differentiable."""
    n, L, h, d, scale = 2, 19, 2, 24, 0.25
    qkv = _rand_qkv(n, L, h, d, seed=9)
    q64 = qkv.double().requires_grad_()
    q, k, _ = q64.view(n, L, 3, h, d).permute(2, 0, 3, 1, 4)
    lse_ref = (torch.einsum("bhid,bhjd->bhij", q, k) * scale).logsumexp(-1)
    out_ref = dk.token_attention_reference(q64, h, scale)
    go, gl = torch.randn_like(out_ref), torch.randn_like(lse_ref)
    (g_ref,) = torch.autograd.grad((out_ref * go).sum() + (lse_ref * gl).sum(), q64)
    x = qkv.clone().requires_grad_()
    out, lse = torch.ops.distilpose.token_attention_fwd(x, h, scale)
    assert lse.dtype == torch.float32 and lse.shape == (n, h, L)
    _check_close("lse", lse.detach(), lse_ref.detach(), 2e-5, 1e-5)
    (g,) = torch.autograd.grad((out * go.float()).sum() + (lse * gl.float()).sum(), x)
    _check_close("dqkv", g, g_ref, 5e-5, 1e-4)


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,L,h,d", [(2, 17, 2, 24), (1, 37, 1, 32)])
def test_low_precision_close_to_float64(dtype, n, L, h, d):
    """fp32 accumulation: our error vs float64 stays within the eager low-precision path's error."""
    qkv = _rand_qkv(n, L, h, d, dtype=dtype, seed=L)
    dout = torch.randn(n, L, h * d, device=DEV).to(dtype)
    out, g = _triton_fwd_bwd(qkv, h, dout)
    assert out.dtype == dtype and g.dtype == dtype
    out_ref, g_ref = _ref_fwd_bwd(qkv, h, dout)
    # the eager reference run in the same low precision, as a yardstick
    x = qkv.clone().requires_grad_()
    o_eager = dk.token_attention_reference(x, h)
    (g_eager,) = torch.autograd.grad(o_eager, x, dout)
    eps = torch.finfo(dtype).eps
    for name, got, eager, want in (("out", out, o_eager, out_ref), ("dqkv", g, g_eager, g_ref)):
        assert torch.isfinite(got).all()
        err = (got.double() - want).abs().max().item()
        err_eager = (eager.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= max(2.0 * err_eager, 4 * eps * scale), f"{name}: err {err:.3g} vs eager {err_eager:.3g}"


# ----------------------------------------------------------------------------- poisoned outputs


def _nan_alloc(shape, device, dtype):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def test_poisoned_outputs_are_fully_overwritten(monkeypatch):
    monkeypatch.setattr(_at(), "_new_output", _nan_alloc)
    monkeypatch.setattr(_at(), "BLOCK_OVERRIDE", (16, 16))
    for n, L, h, d in [(1, 1, 1, 24), (2, 23, 2, 24), (1, 35, 3, 16)]:
        qkv = _rand_qkv(n, L, h, d, seed=L)
        dout = torch.randn(n, L, h * d, device=DEV)
        x = qkv.clone().requires_grad_()
        out, lse = torch.ops.distilpose.token_attention_fwd(x, h, d ** -0.5)
        (g,) = torch.autograd.grad(out, x, dout)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(g).all()
        out_ref, g_ref = _ref_fwd_bwd(qkv, h, dout)
        _check_close("out", out.detach(), out_ref, 2e-5, 1e-4)
        _check_close("dqkv", g, g_ref, 5e-5, 1e-4)


# ----------------------------------------------------------------------------- registration, compile


def test_opcheck_attention_ops():
    qkv = _rand_qkv(2, 19, 2, 24).requires_grad_()
    torch.library.opcheck(torch.ops.distilpose.token_attention_fwd.default, (qkv, 2, 0.2))
    with torch.no_grad():
        out, lse = torch.ops.distilpose.token_attention_fwd(qkv, 2, 0.2)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.distilpose.token_attention_bwd.default, (dout, None, qkv.detach(), out, lse, 2, 0.2))
    torch.library.opcheck(
        torch.ops.distilpose.token_attention_bwd.default, (dout, torch.randn_like(lse), qkv.detach(), out, lse, 2, 0.2)
    )


@pytest.mark.parametrize("backend", ["triton", None])
def test_compile_tde_layer_fullgraph(backend):
    """torch.compile(fullgraph=True) of a TDE layer: no graph break, same values and gradients."""
    from distilpose.models.tde import TransformerLayer

    layer = TransformerLayer(48, 2, 96, attention_backend=backend).to(DEV)
    x = torch.randn(2, 19, 48, device=DEV, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    y_ref = layer(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dispatch


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Triton path must not run for CPU tensors under backend=auto")

    monkeypatch.setattr(_at(), "attention_forward", boom)
    qkv = _rand_qkv(1, 9, 2, 24, device="cpu")
    out = dk.token_attention(qkv, 2)
    torch.testing.assert_close(out, dk.token_attention_reference(qkv, 2), atol=0, rtol=0)
    from distilpose_kernels._utils import triton_interpret

    if triton_interpret():
        with pytest.raises(AssertionError, match="must not run"):
            dk.token_attention(qkv, 2, backend="triton")
    else:  # a GPU machine: forcing Triton on CPU tensors is refused with a clear message
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dk.token_attention(qkv, 2, backend="triton")


def test_float64_uses_reference_or_errors_when_forced():
    qkv = _rand_qkv(1, 9, 2, 24, dtype=torch.float64)
    out = dk.token_attention(qkv, 2)  # auto: the reference takes float64
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="qkv: backend='triton' does not support dtype torch.float64"):
        dk.token_attention(qkv, 2, backend="triton")


def test_import_does_not_import_triton():
    code = (
        "import sys, distilpose_kernels as dk; dk.token_attention; dk.TokenAttention; dk.add_pos_layernorm; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 5, 145), 2), ValueError, r"qkv: last dim must be 3\*C"),
        (lambda: (torch.randn(2, 5, 144), 5), ValueError, r"num_heads: 5 does not divide the width C=48"),
        (lambda: (torch.randint(0, 3, (2, 5, 144)), 2), TypeError, r"qkv: expected a floating-point tensor"),
        (lambda: (torch.randn(5, 144), 2), ValueError, r"qkv: expected a 3-D tensor"),
        (lambda: (torch.randn(2, 5, 144), 0), ValueError, r"num_heads: expected a positive int"),
        (lambda: ([[1.0]], 2), TypeError, r"qkv: expected a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference", None])
def test_bad_inputs(make, exc, match, backend):
    qkv, h = make()
    with pytest.raises(exc, match=match):
        dk.token_attention(qkv, h, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be"):
        dk.token_attention(torch.randn(1, 3, 48), 2, backend="cuda-fast")


def test_mixed_devices_give_clear_errors():
    m = dk.TokenAttention(48, 2)
    with pytest.raises(ValueError, match=r"x: expected a tensor on cpu \(the module's device\), got meta"):
        m(torch.randn(1, 3, 48, device="meta"))
    x = torch.randn(1, 5, 48)
    with pytest.raises(ValueError, match="pos: expected a tensor on cpu"):
        dk.add_pos_layernorm(x, torch.randn(3, 48, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        dk.add_pos_layernorm(x, torch.randn(3, 48), torch.ones(48, device="meta"), backend="reference")


# ----------------------------------------------------------------------------- module


def test_token_attention_module_matches_manual_and_tde_block():
    from distilpose.models.tde import TokenAttentionBlock

    torch.manual_seed(1)
    m = dk.TokenAttention(48, num_heads=2, backend="triton").to(DEV)
    x = torch.randn(2, 13, 48, device=DEV, requires_grad=True)
    y = m(x)
    manual = m.proj(dk.token_attention_reference(m.qkv(x), 2))
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, m.qkv.weight, m.proj.weight], gy)
    grads_ref = torch.autograd.grad(manual, [x, m.qkv.weight, m.proj.weight], gy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    # state dicts interchange with the TDE's attention block
    blk = TokenAttentionBlock(48, 2).to(DEV)
    blk.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(blk(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_heads: 5 does not divide dim 48"):
        dk.TokenAttention(48, 5)


# ----------------------------------------------------------------------------- add position + LayerNorm


def _apln_inputs(n, L, p, c, dtype=torch.float32, affine=True, pos3=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, c, generator=g, dtype=torch.float64) * 2 + 0.5
    pos = torch.randn(p, c, generator=g, dtype=torch.float64)
    if pos3:
        pos = pos.reshape(1, p, c)
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    cast = lambda t: None if t is None else t.to(device=DEV, dtype=dtype)  # noqa: E731
    return cast(x), cast(pos), cast(w), cast(b)


def _apln_grads(fn, inputs, gxo, gy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    xo, y = fn(*leaves)
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((xo * gxo).sum() + (y * gy).sum(), want)
    return xo.detach(), y.detach(), grads


@pytest.mark.parametrize(
    "n,L,p,c,affine,pos3",
    [(2, 20, 16, 48, True, False), (1, 5, 5, 24, False, True), (3, 9, 4, 40, True, True), (1, 1, 1, 16, True, False)],
)
def test_add_pos_layernorm_vs_float64(n, L, p, c, affine, pos3):
    inputs = _apln_inputs(n, L, p, c, affine=affine, pos3=pos3, seed=L)
    gxo = torch.randn(n, L, c, dtype=torch.float64, device=DEV)
    gy = torch.randn(n, L, c, dtype=torch.float64, device=DEV)
    xo, y, g = _apln_grads(lambda *t: dk.add_pos_layernorm(*t, backend="triton"), inputs, gxo.float(), gy.float())
    xo_r, y_r, g_r = _apln_grads(
        lambda *t: attn_mod.add_pos_layernorm_reference(*t), [None if t is None else t.double() for t in inputs], gxo, gy
    )
    _check_close("x_out", xo, xo_r, 1e-6, 1e-6)
    _check_close("y", y, y_r, 2e-5, 1e-5)
    for name, a, b in zip(["dx", "dpos", "dweight", "dbias"], g, g_r):
        _check_close(name, a, b, 1e-4, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_pos_layernorm_low_precision(dtype):
    inputs = _apln_inputs(2, 12, 8, 48, dtype=dtype, seed=4)
    xo, y = dk.add_pos_layernorm(*inputs, backend="triton")
    xo_r, y_r = attn_mod.add_pos_layernorm_reference(*[t.double() for t in inputs])
    assert xo.dtype == dtype and y.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    _check_close("x_out", xo, xo_r, tol, tol)
    _check_close("y", y, y_r, 4 * tol, 2 * tol)


def test_add_pos_layernorm_poisoned_and_opcheck(monkeypatch):
    monkeypatch.setattr(_at(), "_new_output", _nan_alloc)
    inputs = _apln_inputs(2, 11, 7, 40, seed=2)
    gxo, gy = torch.randn(2, 11, 40, device=DEV), torch.randn(2, 11, 40, device=DEV)
    xo, y, g = _apln_grads(lambda *t: dk.add_pos_layernorm(*t, backend="triton"), inputs, gxo, gy)
    xo_r, y_r, g_r = _apln_grads(lambda *t: attn_mod.add_pos_layernorm_reference(*t), inputs, gxo, gy)
    for a, b in zip([xo, y, *g], [xo_r, y_r, *g_r]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    x, pos, w, b = (t.requires_grad_() for t in _apln_inputs(2, 6, 4, 16, seed=1))
    torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default, (x, pos, w, b, 1e-5))
    torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default, (x, pos, None, None, 1e-5))


def test_add_pos_layernorm_matches_tde_sine_full_step():
    """Same result as the TDE's `cat(x[:, :k], x[:, k:] + pos)` followed by its norm1."""
    from distilpose.models.tde import TransformerLayer

    layer = TransformerLayer(48, 2, 96).to(DEV)
    torch.nn.init.normal_(layer.norm1.weight)
    torch.nn.init.normal_(layer.norm1.bias)
    k, p = 3, 10
    x = torch.randn(2, k + p, 48, device=DEV)
    pos = torch.randn(1, p, 48, device=DEV)
    want_x = torch.cat((x[:, :k], x[:, k:] + pos), dim=1)
    want_y = layer.norm1(want_x)
    xo, y = dk.add_pos_layernorm(x, pos, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps, backend="triton")
    torch.testing.assert_close(xo, want_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, want_y, atol=2e-5, rtol=1e-5)


def test_add_pos_layernorm_bad_inputs():
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"pos: expected \(P, 16\) with P <= L=5"):
        dk.add_pos_layernorm(x, torch.randn(6, 16))
    with pytest.raises(ValueError, match=r"pos: expected \(P, 16\)"):
        dk.add_pos_layernorm(x, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"pos: expected \(P, C\) or \(1, P, C\)"):
        dk.add_pos_layernorm(x, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"weight: expected shape \(16\)"):
        dk.add_pos_layernorm(x, torch.randn(3, 16), torch.ones(8))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        dk.add_pos_layernorm(x.long(), torch.randn(3, 16))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,L,h,d", [(4, 273, 8, 24), (2, 1000, 4, 64), (1, 4096, 2, 128), (3, 77, 8, 16)])
def test_gpu_autotuned_vs_float64(dtype, n, L, h, d):
    qkv = _rand_qkv(n, L, h, d, dtype=dtype, device="cuda", seed=L)
    dout = torch.randn(n, L, h * d, device="cuda").to(dtype)
    out, g = _triton_fwd_bwd(qkv, h, dout)
    out_ref, g_ref = _ref_fwd_bwd(qkv, h, dout)
    x = qkv.clone().requires_grad_()
    o_eager = dk.token_attention_reference(x, h)
    (g_eager,) = torch.autograd.grad(o_eager, x, dout)
    for name, got, eager, want in (("out", out, o_eager, out_ref), ("dqkv", g, g_eager, g_ref)):
        err = (got.double() - want).abs().max().item()
        err_eager = (eager.double() - want).abs().max().item()
        floor = 4 * torch.finfo(dtype).eps * want.abs().max().item()
        assert err <= max(2.0 * err_eager, floor), f"{name}: err {err:.3g} vs eager {err_eager:.3g}"


@pytest.mark.gpu
def test_gpu_dispatch_and_force_reference(monkeypatch):
    calls = []
    real = _at().attention_forward
    monkeypatch.setattr(_at(), "attention_forward", lambda *a: calls.append(1) or real(*a))
    qkv = _rand_qkv(2, 17, 2, 24, device="cuda")
    dk.token_attention(qkv, 2)
    assert calls == [1]
    monkeypatch.setenv("DISTILPOSE_FORCE_REFERENCE", "1")
    dk.token_attention(qkv, 2)
    assert calls == [1]


@pytest.mark.gpu
def test_gpu_compile_inductor_tde_layer():
    from distilpose.models.tde import TransformerLayer

    layer = TransformerLayer(192, 8, 576).cuda()
    x = torch.randn(4, 273, 192, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- AOT compile for sm_90 (no GPU needed)

_AOT_SCRIPT = r"""
import distilpose_kernels.attention_triton as at

for p, prec in (("*bf16", "tf32"), ("*fp32", "ieee"), ("*fp32", "tf32x3")):
    c = dict(HEAD_DIM=24, BLOCK_D=32, BLOCK_M=64, BLOCK_N=64, PRECISION=prec, UPCAST=False)
    bwd = dict(QKV=p, DO=p, LSE="*fp32", Delta="*fp32", DQKV=p)
    fwd_ptrs = dict(QKV=p, Out=p, LSE="*fp32", WS="*fp32", WML="*fp32", CNT="*i32")
    compile_(at._attn_fwd_kernel, fwd_ptrs, dict(qk_scale="fp32"), dict(c, SPLIT=1), num_warps=4, num_stages=3)
    for bm, bn, w, s, sp in at.SPLIT_CONFIGS:  # the split-key forward (batch-1 launches)
        compile_(at._attn_fwd_kernel, fwd_ptrs, dict(qk_scale="fp32"), dict(c, BLOCK_M=bm, BLOCK_N=bn, SPLIT=sp),
                 num_warps=w, num_stages=s)
    compile_(at._attn_bwd_dkdv_kernel, bwd, dict(qk_scale="fp32", sm_scale="fp32"), c, num_warps=4)
    compile_(at._attn_bwd_dq_kernel, bwd, dict(qk_scale="fp32", sm_scale="fp32"), c, num_warps=4)
p = "*bf16"
for has_pos, has_res in ((True, False), (True, True), (False, True)):
    compile_(at._apln_fwd_kernel, dict(X=p, POS=p, W=p, B=p, XO=p, Y=p, Mean="*fp32", Rstd="*fp32", RES=p),
             dict(eps="fp32"), dict(HAS_W=True, HAS_B=True, HAS_POS=has_pos, HAS_RES=has_res, BLOCK_R=16, BLOCK_C=256))
compile_(at._apln_bwd_kernel, dict(DXO=p, DY=p, XO=p, W=p, Mean="*fp32", Rstd="*fp32", DX=p, DW="*fp32", DB="*fp32"),
         {}, dict(HAS_DXO=True, HAS_W=True, BLOCK_R=16, BLOCK_C=256))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter is lenient; lowering to an sm_90 cubin (ptxas) catches real compile errors."""
    compile_for_sm90(_AOT_SCRIPT)


def test_add_pos_layernorm_eager_function_custom_op_and_no_grad_paths_agree():
    """The public op runs an autograd.Function (grad), the kernels directly (no grad) or the custom
    op (under torch.compile); all three give the same values and gradients."""
    inputs = _apln_inputs(2, 11, 7, 40, seed=5)
    gxo, gy = torch.randn(2, 11, 40, device=DEV), torch.randn(2, 11, 40, device=DEV)
    xo, y, g = _apln_grads(lambda *t: dk.add_pos_layernorm(*t, backend="triton"), inputs, gxo, gy)
    xo_c, y_c, g_c = _apln_grads(lambda *t: attn_mod._apln_fwd(*t, 1e-5)[:2], inputs, gxo, gy)
    with torch.no_grad():
        xo_n, y_n = dk.add_pos_layernorm(*inputs, backend="triton")
    for a, b in zip([xo, y, *g], [xo_c, y_c, *g_c]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(xo_n, xo, rtol=0, atol=0)
    torch.testing.assert_close(y_n, y, rtol=0, atol=0)
    # only y used: the unused x_out gradient arrives as None (no materialised zeros)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    _, y1 = dk.add_pos_layernorm(*leaves, backend="triton")
    (y1 * gy).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("n,L,p,c", [(2, 20, 16, 48), (1, 7, 3, 24), (3, 5, 5, 40)])
def test_add_pos_layernorm_with_residual_vs_float64(n, L, p, c, with_pos):
    """x_out = x + residual (+ pos on the last P tokens): the pre-norm layer's "add + LayerNorm"."""
    x, pos, w, b = _apln_inputs(n, L, p, c, seed=L + c)
    g = torch.Generator(device="cpu").manual_seed(7)
    res = torch.randn(L, n, c, generator=g).to(DEV).transpose(0, 1)  # non-contiguous: strides are honoured
    pos = pos if with_pos else None
    inputs = (x, pos, w, b)
    gxo = torch.randn(n, L, c, dtype=torch.float64, device=DEV)
    gy = torch.randn(n, L, c, dtype=torch.float64, device=DEV)

    def run(fn, ins, r):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (*ins, r)]
        xo, y = fn(*leaves[:4], residual=leaves[4])
        want = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((xo * gxo.to(xo.dtype)).sum() + (y * gy.to(y.dtype)).sum(), want)
        return xo.detach(), y.detach(), grads

    xo, y, gr = run(lambda *t, residual: dk.add_pos_layernorm(*t, backend="triton", residual=residual), inputs, res)
    xo_r, y_r, gr_r = run(attn_mod.add_pos_layernorm_reference, [None if t is None else t.double() for t in inputs],
                          res.double())
    _check_close("x_out", xo, xo_r, 1e-6, 1e-6)
    _check_close("y", y, y_r, 2e-5, 1e-5)
    assert len(gr) == len(gr_r) == (5 if with_pos else 4)
    for i, (a, bb) in enumerate(zip(gr, gr_r)):
        _check_close(f"grad {i}", a, bb, 1e-4, 1e-4)
    torch.testing.assert_close(gr[0], gr[-1])  # d residual == d x
    with torch.no_grad():  # the kernels-only inference path
        xo_n, y_n = dk.add_pos_layernorm(x, pos, w, b, backend="triton", residual=res)
    torch.testing.assert_close(xo_n, xo, rtol=0, atol=0)
    torch.testing.assert_close(y_n, y, rtol=0, atol=0)


def test_add_pos_layernorm_residual_checks_and_opcheck():
    x, pos, w, b = _apln_inputs(2, 6, 4, 16, seed=3)
    with pytest.raises(ValueError, match="residual: expected shape"):
        dk.add_pos_layernorm(x, pos, w, b, residual=x[:, :3])
    with pytest.raises(TypeError, match="residual: expected a floating"):
        dk.add_pos_layernorm(x, pos, w, b, residual=torch.ones(x.shape, dtype=torch.int32, device=x.device))
    # a residual of another float dtype (an autocast branch's bf16 output into an fp32 stream):
    # x_out in x's dtype on every backend, the residual's gradient in its own dtype
    r16 = torch.randn(x.shape, dtype=torch.bfloat16, device=x.device).requires_grad_()
    for be in ("reference", "triton"):
        xr = x.detach().clone().requires_grad_()
        xo, y = dk.add_pos_layernorm(xr, pos, w, b, backend=be, residual=r16)
        assert xo.dtype == y.dtype == x.dtype
        want = attn_mod.add_pos_layernorm_reference(x.double(), pos.double(), w.double(), b.double(),
                                                    residual=r16.detach().double())
        _check_close("x_out", xo, want[0], 1e-6, 1e-6)
        _check_close("y", y, want[1], 2e-5, 1e-5)
        gx, gr = torch.autograd.grad(y.sum() + xo.sum(), (xr, r16))
        assert gr.dtype == torch.bfloat16 and torch.equal(gr, gx.to(torch.bfloat16))
    torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default,
                          (x.clone().requires_grad_(), pos, w, b, 1e-5, r16.detach().clone().requires_grad_()))
    res = torch.randn_like(x)
    for p in (pos, None):
        args = tuple(t.requires_grad_() if t is not None else None for t in (x, p, w, b))
        torch.library.opcheck(torch.ops.distilpose.add_pos_layernorm_fwd.default,
                              (*args, 1e-5, res.clone().requires_grad_()))


@pytest.mark.parametrize("pos_mode", ["sine-full", "sine", "none"])
def test_tde_fused_residual_norms_match_the_plain_layers(pos_mode):
    """TokenDistillingEncoder with fuse_pos_norm (every residual add fused into the next LayerNorm,
    Triton kernels) gives the plain layers' tokens and gradients."""
    from distilpose.models.tde import TokenDistillingEncoder

    torch.manual_seed(0)
    tde = TokenDistillingEncoder(in_channels=4, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=16,
                                 depth=3, num_heads=2, mlp_dim=8, pos_mode=pos_mode, attention_backend="triton").to(DEV)
    for m in tde.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    feat = torch.randn(2, 4, 8, 6, device=DEV, requires_grad=True)
    outs = {}
    for fused in (False, True):
        tde.fuse_pos_norm = fused
        tde.zero_grad(set_to_none=True)
        feat.grad = None
        kpt, vis = tde(feat)
        (kpt.square().sum() + vis.sin().sum()).backward()
        outs[fused] = (kpt.detach(), vis.detach(), feat.grad.clone(), tde.layers[1].norm2.weight.grad.clone(),
                       tde.patch_embed.weight.grad.clone())
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_split_key_workspace_only_while_a_split_config_may_run(monkeypatch):
    """The split-key forward's workspace and counters: for every split candidate until the
    bucket is tuned, then only if its tuned config splits (no allocation nor counters' fill
    per call when a one-pass config won); none for large launches."""
    triton = pytest.importorskip("triton")
    at = _at()
    monkeypatch.setattr(at, "AUTOTUNE", True)
    monkeypatch.setattr(at, "_TUNED", {"fwd_small": object(), "fwd": object()})
    monkeypatch.setattr(at, "_BUCKET_CONFIGS", {})
    bucket = at._bucket("fwd_small", 273, 32, torch.float32, 24, "ieee")
    ws, wml, cnt = at._split_workspace("fwd_small", 273, 16, 32, torch.device("cpu"), bucket)
    s_max, bm_min = max(c[4] for c in at.SPLIT_CONFIGS), min(c[0] for c in at.SPLIT_CONFIGS)
    assert ws.shape == (s_max, 16, 273, 32) and wml.shape == (s_max, 16, 273, 2)
    assert cnt.numel() == 16 * -(-273 // bm_min) and not cnt.any()
    at._BUCKET_CONFIGS[bucket] = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "SPLIT": 1})
    assert at._split_workspace("fwd_small", 273, 16, 32, torch.device("cpu"), bucket) is None
    at._BUCKET_CONFIGS[bucket] = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT": 3})
    ws, _, cnt = at._split_workspace("fwd_small", 273, 16, 32, torch.device("cpu"), bucket)
    assert ws.shape[0] == 3 and cnt.numel() == 16 * 9
    assert at._split_workspace("fwd", 273, 64 * 8, 32, torch.device("cpu"), bucket) is None


@pytest.mark.interpreter  # bit-for-bit: on a GPU the slices' shapes may autotune other tiles
def test_attention_batches_beyond_the_grid_limit_launch_in_slices(monkeypatch):
    """N * heads over CUDA's 65,535 programs on a grid's second axis (e.g. 8,192 crops x 8
    heads): the kernels launch once per slice of the batch, with the same results as one launch
    (here the limit is lowered to 5: 3 sequences x 2 heads)."""
    at = _at()
    qkv = _rand_qkv(3, 21, 2, 8)
    dout = torch.randn(3, 21, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(qkv)
    x, w, b = qkv[..., :16].contiguous(), qkv[0, :16, :48].T.contiguous() * 0.2, qkv[0, 0, :48].contiguous()
    whole = (*_triton_fwd_bwd(qkv, 2, dout), dk.qkv_attention(x, w, 2, bias=b, backend="triton"))
    launches = []
    real = at._attention_forward_into
    monkeypatch.setattr(at, "_attention_forward_into", lambda q, *a: launches.append(q.shape[0]) or real(q, *a))
    monkeypatch.setattr(at, "MAX_GRID_Y", 5)
    sliced = (*_triton_fwd_bwd(qkv, 2, dout), dk.qkv_attention(x, w, 2, bias=b, backend="triton"))
    assert launches == [2, 1]
    for got, want in zip(sliced, whole):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(at, "MAX_GRID_Y", 1)
    with pytest.raises(ValueError, match="num_heads: 2 heads exceed"):
        dk.token_attention(qkv, 2, backend="triton")
