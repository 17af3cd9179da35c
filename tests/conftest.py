"""Test setup. Without a GPU, Triton kernels run under its CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is set
here, before the kernel modules are imported by the tests.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        from distilpose_kernels._utils import triton_interpret

        if triton_interpret():
            return
        # On a GPU machine the interpreter is off, so tests that run the Triton kernels on CPU
        # tensors cannot; test_gpu_kernels.py checks the same kernels on the device instead.
        # A gpu-marked test runs on the device even in a module marked "interpreter" as a whole
        # (tests/test_heads.py, tests/test_targets.py): it is what the GPU run is for.
        skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (CI)")
        for item in items:
            if "interpreter" in item.keywords and "gpu" not in item.keywords:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def stub_cuda_timer(monkeypatch):
    """For the ops' timed "auto" choice (``_utils.timed_choice``) on a CPU: times come from the
    returned dict by the timed function's name ({"fused": ms, "reference": ms}), and no CUDA
    graph is being captured (CPU torch would raise on the query)."""
    from distilpose_kernels import _utils

    times = {"fused": 1.0, "reference": 2.0}
    monkeypatch.setattr(_utils, "cuda_time_ms", lambda fn, rounds=3, reps=5, device_only=False: times[fn.__name__])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return times


@pytest.fixture
def matmul_tf32():
    """``matmul_tf32(flag)`` sets ``torch.backends.cuda.matmul.allow_tf32`` for the test and
    restores it afterwards. (pytest's monkeypatch cannot: that module answers the attribute
    from ``__getattr__``, and recent pytest then tries to delete it on undo.)"""
    old = torch.backends.cuda.matmul.allow_tf32

    def set_flag(flag: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = flag

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = old
