"""One launch of a kernel whose speed goal is missed, for Nsight Compute (``ncu``) to read its
hardware counters (GPU only).

    ncu --clock-control none --profile-from-start off --csv --page details \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats python tools/ncu_cases.py loss

Each case first runs its op once outside the profiled range (Triton compiles, autotunes, the
"auto" choices are made), then runs it once between ``cudaProfilerStart`` / ``Stop``: with
``--profile-from-start off`` ncu sees only that call's kernels. ``scripts/gpu_check.py``'s
``ncu`` stage runs every case and keeps the CSV.

Cases: ``loss`` (simulated_heatmap_loss forward + backward, N=256, fp32 teacher: the bandwidth
goal), ``add_norm_b1`` (linear_add_norm at the batch-1 flip shape, fp32, K=576), ``attention_b1``
(token_attention forward at that shape, fp32), ``stem_b64`` (the stem conv's Triton kernel,
batch 64 bf16 channels-last).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

L, C, HID = 273, 192, 576


def _loss() -> Callable[[], object]:
    import torch

    import distilpose_kernels as dk

    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 256, 17
    coords = torch.rand(n, k, 2, device="cuda", generator=g).requires_grad_()
    sigma = (torch.rand(n, k, 2, device="cuda", generator=g) * 2 + 0.5).requires_grad_()
    score = torch.rand(n, k, 1, device="cuda", generator=g).requires_grad_()
    teacher = torch.rand(n, k, 64, 48, device="cuda", generator=g)
    weight = torch.ones(n, k, 1, device="cuda")

    def step():
        reg, sc = dk.simulated_heatmap_loss(coords, sigma, score, teacher, weight)
        (reg + sc).backward()

    return step


def _add_norm_b1() -> Callable[[], object]:
    import torch

    import distilpose_kernels as dk

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x, w, b, res, lw, lb, pos = r(2, L, HID), r(C, HID) / HID ** 0.5, r(C), r(2, L, C), r(C).abs() + 0.5, r(C), r(1, 256, C)
    return lambda: dk.linear_add_norm(x, w, b, res, lw, lb, 1e-5, pos, backend="triton")


def _attention_b1() -> Callable[[], object]:
    import torch

    import distilpose_kernels as dk

    qkv = torch.randn(2, L, 3 * C, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    return lambda: dk.token_attention(qkv, 8, backend="triton")


def _stem_b64() -> Callable[[], object]:
    import torch

    import distilpose_kernels as dk

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 3, 256, 192, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 3, 3, 3, device="cuda", generator=g) / 27 ** 0.5).to(torch.bfloat16)
    b = torch.randn(64, device="cuda", generator=g).to(torch.bfloat16)
    return lambda: dk.conv2d_relu(x, w, b, stride=2, padding=1, backend="triton")


CASES: Dict[str, Callable[[], Callable[[], object]]] = {
    "loss": _loss, "add_norm_b1": _add_norm_b1, "attention_b1": _attention_b1, "stem_b64": _stem_b64,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(CASES))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("ncu_cases: needs a CUDA device", file=sys.stderr)
        return 2
    with torch.inference_mode(args.case != "loss"):
        step = CASES[args.case]()
        step()  # compiles, autotunes and "auto" choices: outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ncu_cases: {args.case} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
