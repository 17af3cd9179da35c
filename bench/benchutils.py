"""Shared helpers for the pytest-benchmark suites in bench/: ``from benchutils import run_benchmark``.

(bench/ is on sys.path while pytest collects it; a separate module name avoids clashing
with tests/conftest.py when both folders run in one session.)

- ``run_benchmark(benchmark, fn, device=..., flops=..., bytes_moved=..., **extra)``: times
  ``fn`` with pytest-benchmark; on CUDA the timer synchronises the device at the edges of
  each round (so a round times queued kernels, not launches) and the iterations per round
  are calibrated to ~2 ms. Records median seconds, TFLOP/s and GB/s (when flops / bytes are
  given), the device name and ``env_metadata()`` in ``benchmark.extra_info``.
- ``device_name(device)``, ``env_metadata()`` (device, torch/triton/CUDA versions, git commit),
  ``synchronize(device)``, ``skip_unless_cuda()``.

Timing method: medians over rounds (pytest-benchmark's statistics); every timed function
must be self-contained (warm it up: compile/autotune happen in the warmup calls).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pytest
import torch

import distilpose_kernels as dk

Device = Union[str, torch.device]
_REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- environment


def skip_unless_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def device_name(device: Optional[Device] = None) -> str:
    """Human-readable name of ``device`` (CUDA: the GPU's name; CPU: the processor)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return _cpu_name()


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


@functools.lru_cache(maxsize=None)
def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_metadata(device: Optional[Device] = None) -> dict[str, Any]:
    """Versions and machine facts to store next to every number."""
    meta: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton  # noqa: WPS433 (benchmarks may import triton)

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        meta["sm_count"] = p.multi_processor_count
        meta["capability"] = f"{p.major}.{p.minor}"
    return meta


# ----------------------------------------------------------------------------- timing


def synchronize(device: Device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _synced_timer(device: Device) -> Callable[[], float]:
    def timer() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return timer


def _calibrate(fn: Callable[[], Any], device: Device, target_s: float, warmup: int) -> int:
    for _ in range(warmup):
        fn()
    synchronize(device)
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        t = time.perf_counter() - t0
        if t >= target_s / 4 or n >= 1 << 14:
            break
        n *= 4
    per_call = max(t / n, 1e-9)
    return max(1, min(1 << 14, math.ceil(target_s / per_call)))


def run_benchmark(
    benchmark,
    fn: Callable[[], Any],
    *,
    device: Device,
    flops: Optional[float] = None,
    bytes_moved: Optional[float] = None,
    rounds: Optional[int] = None,
    warmup: int = 3,
    target_round_s: float = 2e-3,
    **extra: Any,
) -> Any:
    """Time ``fn()`` (no arguments) and record metadata + throughput in ``benchmark.extra_info``.

    CUDA: the round timer synchronises the device; iterations per round are chosen so a
    round lasts about ``target_round_s``; ``rounds`` defaults to 30. CPU: ``rounds``
    defaults to 5 with one call per round. Returns the last result of ``fn``.
    """
    dev = torch.device(device)
    benchmark.extra_info.update(env_metadata(dev))
    benchmark.extra_info.update(extra)
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = float(bytes_moved)
    if dev.type == "cuda":
        iterations = _calibrate(fn, dev, target_round_s, warmup)
        benchmark._timer = _synced_timer(dev)  # pytest-benchmark reads the timer from here
        result = benchmark.pedantic(fn, rounds=rounds or 30, iterations=iterations, warmup_rounds=1)
    else:
        result = benchmark.pedantic(fn, rounds=rounds or 5, iterations=1, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    if median:
        benchmark.extra_info["median_s"] = median
        if flops is not None:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        if bytes_moved is not None:
            benchmark.extra_info["gbps"] = bytes_moved / median / 1e9
    return result


# ----------------------------------------------------------------------------- CUDA graphs


def cuda_graph(fn: Callable[[], Any], warmup: int = 3, pdl: Any = None) -> Callable[[], Any]:
    """Capture ``fn()`` in a CUDA graph (``distilpose_kernels.capture_cuda_graph``: ``warmup``
    calls on a side stream first, "auto" choices on device time) and return a callable that replays it and returns the captured output
    (static buffers that each replay overwrites). Timing the replays leaves device time: no
    per-call Python or launch overhead. The replay keeps ``fn`` (and so every buffer it closes
    over) alive: freed, those buffers would be unmapped by the next capture's empty_cache().
    ``pdl``: programmatic dependent launch of the library's kernels in the graph (as
    ``capture_cuda_graph``'s: None as the environment says, True, False or "auto")."""
    graph, out = dk.capture_cuda_graph(fn, warmup=warmup, pdl=pdl)

    def replay(graph=graph, fn=fn, out=out):
        graph.replay()
        return out

    return replay


# ----------------------------------------------------------------------------- cache rotation


def input_copies(nbytes: float, device: Device, factor: float = 3.0, cap: int = 64) -> int:
    """How many input sets to rotate through so repeated calls read HBM, not the L2 cache:
    enough copies for ``factor`` x the device's L2 (1 on CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda" or nbytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0
    return max(1, min(cap, math.ceil(factor * l2 / nbytes)))


def rotate(steps: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs ``steps[0]``, ``steps[1]``, ... in turn (each on its own inputs)."""
    if len(steps) == 1:
        return steps[0]
    it = itertools.cycle(steps)
    return lambda: next(it)()
