"""Python host overhead of each fused op per call, measured on the CPU with the kernels stubbed.

    python tools/host_overhead.py [--json out.json] [--repeat 2000]

The per-call speed goals on a GPU (loss vs eager, targets vs the numpy loop, attention vs
flash) are bound by host time at the spec's sizes: the kernels take tens of microseconds, the
call several hundred. This tool isolates the part this library owns: argument checks,
dispatch, autograd plumbing, launch planning and allocations. It runs the Triton path on CPU
tensors (``TRITON_INTERPRET=1``) with every kernel launch replaced by a no-op, so the numbers
exclude Triton's own launcher and the kernels, and compares each op with a trivial
``autograd.Function`` of the same signature (the floor: what autograd and ``backward()``
cost with no work at all). Host-side numbers depend on the CPU; compare runs on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402

import distilpose_kernels as dk  # noqa: E402
from distilpose.fileio import atomic_write  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def stub_kernels() -> None:
    """Replace every Triton kernel launch of the op library by a no-op."""
    from distilpose_kernels import attention_triton as at
    from distilpose_kernels import heatmap_triton as ht

    for mod in (ht, at):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch())
    at._RAW = {k: _NoLaunch() for k in at._RAW}
    at._TUNED = {}


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    """Best of 5 means of ``repeat`` calls, in microseconds."""
    for _ in range(min(100, repeat)):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat * 1e6)
    return best


def _floor_function(out_shapes):
    """A do-nothing autograd.Function returning empty tensors of ``out_shapes``."""

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.shapes = [a.shape for a in args]
            outs = tuple(args[0].new_empty(s) for s in out_shapes)
            return outs if len(outs) > 1 else outs[0]

        @staticmethod
        def backward(ctx, *grads):
            return tuple(torch.empty(s) for s in ctx.shapes)

    return Floor


def cases() -> Dict[str, Dict[str, Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    n, k, h, w = 256, 17, 64, 48
    coords = torch.rand(n, k, 2, generator=g).requires_grad_()
    sigma = (torch.rand(n, k, 2, generator=g) + 1).requires_grad_()
    score = torch.rand(n, k, 1, generator=g).requires_grad_()
    teacher = torch.rand(n, k, h, w, generator=g)
    kw = torch.ones(n, k, 1)
    loss_floor = _floor_function([(), ()])

    def loss():
        r, s = dk.simulated_heatmap_loss(coords, sigma, score, teacher, kw, backend="triton")
        (r + s).backward()

    def loss_floor_call():
        r, s = loss_floor.apply(coords, sigma, score)
        (r + s).backward()

    kp = torch.rand(64, 17, 2, generator=g) * 192
    vis = torch.ones(64, 17)

    def targets():
        dk.gaussian_heatmap_targets(kp, vis, (256, 192), (64, 48), backend="triton")

    def targets_floor():
        torch.empty(64, 17, 64, 48)
        torch.empty(64, 17, 1)

    # TDE-S tokens (192 + 17), batch 1: host cost does not depend on the batch, and large CPU
    # allocations would only add page-fault time that a GPU's caching allocator does not have.
    qkv = torch.randn(1, 209, 3 * 192, generator=g).requires_grad_()
    dout = torch.randn(1, 209, 192, generator=g)
    attn_floor = _floor_function([(1, 209, 192)])

    def attention():
        dk.token_attention(qkv, 8, backend="triton").backward(dout)

    def attention_floor():
        attn_floor.apply(qkv).backward(dout)

    # the TDE's sine-full step at the same token count
    from distilpose_kernels import attention as attn_mod

    x = torch.randn(1, 209, 192, generator=g).requires_grad_()
    pos = torch.randn(1, 192, 192, generator=g)
    lw, lb = torch.ones(192, requires_grad=True), torch.zeros(192, requires_grad=True)
    gy = torch.randn(1, 209, 192, generator=g)
    apln_floor = _floor_function([(1, 209, 192), (1, 209, 192)])

    def apln():
        _, y = dk.add_pos_layernorm(x, pos, lw, lb, backend="triton")
        y.backward(gy)

    def apln_custom_op():  # what the public op ran per eager call before the autograd.Function path
        _, y, _, _ = attn_mod._apln_fwd(x, pos, lw, lb, 1e-5)
        y.backward(gy)

    def apln_floor_call():
        _, y = apln_floor.apply(x, pos, lw, lb)
        y.backward(gy)

    def apln_infer():
        with torch.no_grad():
            dk.add_pos_layernorm(x, pos, lw, lb, backend="triton")

    def apln_infer_floor():
        with torch.no_grad():
            torch.empty(1, 209, 192)
            torch.empty(1, 209, 192)

    return {
        "add_pos_layernorm fwd+bwd (L=209)": {"op": apln, "floor": apln_floor_call},
        "add_pos_layernorm fwd+bwd via torch.library op": {"op": apln_custom_op, "floor": apln_floor_call},
        "add_pos_layernorm fwd, no grad (L=209)": {"op": apln_infer, "floor": apln_infer_floor},
        "simulated_heatmap_loss fwd+bwd (N=256)": {"op": loss, "floor": loss_floor_call},
        "gaussian_heatmap_targets (N=64)": {"op": targets, "floor": targets_floor},
        "token_attention fwd+bwd (L=209)": {"op": attention, "floor": attention_floor},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args(argv)
    stub_kernels()
    torch.set_num_threads(1)
    rows = []
    for name, fns in cases().items():
        op = per_call_us(fns["op"], args.repeat)
        floor = per_call_us(fns["floor"], args.repeat)
        rows.append({"case": name, "op_us": round(op, 1), "floor_us": round(floor, 1), "overhead_us": round(op - floor, 1)})
    print(f"{'case':48s} {'op us':>8s} {'floor us':>9s} {'ours us':>8s}")
    for r in rows:
        print(f"{r['case']:48s} {r['op_us']:8.1f} {r['floor_us']:9.1f} {r['overhead_us']:8.1f}")
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                "torch": torch.__version__, "cpus": os.cpu_count()}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
        atomic_write(args.json, json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
