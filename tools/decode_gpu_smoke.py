"""GPU smoke test of the CUDA decode kernels, small enough to run under compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/decode_gpu_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/decode_gpu_smoke.py

Runs soft_argmax forward/backward and decode_heatmaps (argmax, DARK) through the compiled
CUDA kernels for every dtype on odd shapes (H*W smaller and larger than a block, K = 17 and
133, batch 1, non-contiguous input, NaN / -inf maps) and compares with the CPU results.
Exits 1 on a mismatch, 2 when CUDA or the CUDA kernels are missing.
"""
from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("decode_gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    import distilpose_kernels as dk
    from distilpose_kernels import _ext

    if not _ext.available("cuda"):
        print(f"decode_gpu_smoke: CUDA kernels not built ({_ext.load().error or 'CPU-only build'})", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    failures = 0
    shapes = [(1, 17, 64, 48), (2, 133, 17, 13), (3, 5, 1, 7), (1, 2, 67, 61)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape in shapes:
            x = (torch.randn(*shape, generator=g) * 3).to(dtype)
            if shape[1] > 2:
                x[0, 0, 0, 0] = float("nan")
                x[0, 1] = float("-inf")
            for src in (x, x.transpose(2, 3)):
                xc = src.cuda().requires_grad_(True)
                c, f = dk.soft_argmax(xc, 2.0, backend="cuda")
                gout = torch.randn(c.shape, generator=g)
                (c * gout.cuda()).nan_to_num().sum().backward()
                xr = src.clone().requires_grad_(True)
                rc, rf = dk.soft_argmax(xr, 2.0, backend="reference")
                (rc * gout).nan_to_num().sum().backward()
                tol = 1e-9 if dtype == torch.float64 else 3e-4
                ok = torch.allclose(c.cpu(), rc, atol=tol * max(shape[2:]), rtol=0, equal_nan=True)
                ok &= torch.allclose(f.cpu(), rf, atol=tol, rtol=tol, equal_nan=True)
                gr, gc = xr.grad.float().nan_to_num(), xc.grad.cpu().float().nan_to_num()
                gtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
                ok &= torch.allclose(gc, gr, atol=gtol * max(gr.abs().max().item(), 1e-30), rtol=0)
                hm = src.detach().abs().nan_to_num(nan=float("nan"), neginf=0.0)
                for method in ("argmax", "dark"):
                    dc, dv = dk.decode_heatmaps(hm.cuda(), method, 11, backend="cuda")
                    rdc, rdv = dk.decode_heatmaps(hm, method, 11, backend="cpp" if _ext.available("cpu") else "reference")
                    ok &= torch.allclose(dv.cpu(), rdv, atol=0, rtol=0, equal_nan=True)
                    ok &= torch.allclose(dc.cpu(), rdc, atol=2e-3 if method == "dark" else 0, rtol=0)
                if not ok:
                    failures += 1
                    print(f"MISMATCH dtype={dtype} shape={tuple(src.shape)} contiguous={src.is_contiguous()}")
    torch.cuda.synchronize()
    print(f"decode_gpu_smoke: {'OK' if failures == 0 else f'{failures} FAILURES'} on {torch.cuda.get_device_name()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
