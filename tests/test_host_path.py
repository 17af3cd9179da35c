"""The ops' host-side fast paths: launch arithmetic, lazy kernel modules, cheap input checks.

The per-call cost of the fused ops at the spec's sizes is host time, so their wrappers take
shortcuts (pure-Python launch arithmetic, cached plans, one cheap all-valid test before the
detailed checks). These tests pin that the shortcuts agree with what they replace.
"""
import sys

import pytest
import torch

from distilpose_kernels import _utils
from distilpose_kernels import heatmap as hm


@pytest.mark.parametrize("n", list(range(0, 70)) + [127, 128, 129, 1000, 1023, 1024, 1025, 2 ** 31 - 1, 2 ** 31 + 1])
def test_next_pow2_and_cdiv_match_triton(n):
    triton = pytest.importorskip("triton")
    assert _utils.next_pow2(n) == triton.next_power_of_2(max(1, n))  # callers clamped n >= 1 before
    for b in (1, 2, 3, 16, 17, 64, 1024):
        assert _utils.cdiv(n, b) == triton.cdiv(n, b)


def test_lazy_module_imports_once_on_first_call(monkeypatch):
    name = "json.decoder"
    monkeypatch.delitem(sys.modules, name, raising=False)
    load = _utils.lazy_module(name)
    assert name not in sys.modules  # nothing imported before the first call
    mod = load()
    assert mod is sys.modules[name]
    monkeypatch.delitem(sys.modules, name)
    assert load() is mod  # served from the loader's cell afterwards


def _loss_args(n=3, k=5, h=7, w=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        torch.rand(n, k, 2, generator=g, dtype=dtype),
        torch.rand(n, k, 2, generator=g, dtype=dtype) + 0.5,
        torch.rand(n, k, 1, generator=g, dtype=dtype),
        torch.rand(n, k, h, w, generator=g, dtype=dtype),
        torch.ones(n, k, 1),
    ]


def _mutations():
    """(description, index of the argument, replacement) covering every clause of the checks."""
    base = _loss_args()
    yield "valid", None, None
    yield "fp16 coords", 0, base[0].half()
    yield "bf16 teacher", 3, base[3].bfloat16()
    yield "fp64 everything", -1, None
    yield "int weights", 4, torch.ones(3, 5, 1, dtype=torch.int64)
    yield "bool weights", 4, torch.ones(3, 5, 1, dtype=torch.bool)
    yield "coords K mismatch", 0, torch.rand(3, 4, 2)
    yield "coords rank", 0, torch.rand(3, 5, 2, 1)
    yield "sigma last dim", 1, torch.rand(3, 5, 3)
    yield "score shape", 2, torch.rand(3, 5)
    yield "weights shape", 4, torch.ones(3, 5)
    yield "teacher rank", 3, torch.rand(3, 5, 42)
    yield "teacher int", 3, torch.randint(0, 3, (3, 5, 7, 6))
    yield "coords int", 0, torch.randint(0, 3, (3, 5, 2))
    yield "score not a tensor", 2, [[0.0]]
    yield "teacher not a tensor", 3, None
    yield "meta device coords", 0, torch.empty(3, 5, 2, device="meta")


@pytest.mark.parametrize("case", list(_mutations()), ids=lambda c: c[0])
def test_fast_loss_check_never_accepts_what_the_full_check_rejects(case):
    _, idx, value = case
    args = _loss_args(dtype=torch.float64) if idx == -1 else _loss_args()
    if idx is not None and idx >= 0:
        args[idx] = value
    fast = hm._loss_inputs_ok(*args)
    try:
        hm._check_loss_inputs(*args)
        full = True
    except (TypeError, ValueError):
        full = False
    if fast:
        assert full, "the fast check passed inputs that the detailed checks reject"
    # and the public op reports every rejected input with an error naming an argument
    if not full:
        with pytest.raises((TypeError, ValueError), match=r"coords|sigma|score|teacher_heatmaps|keypoint_weight"):
            hm.simulated_heatmap_loss(*args, backend="reference")


def test_fast_loss_check_accepts_the_common_case():
    assert hm._loss_inputs_ok(*_loss_args())
    a = _loss_args()
    a[3] = a[3].half()
    assert hm._loss_inputs_ok(*a)


@pytest.mark.parametrize("value, default, want", [
    (None, True, True), (None, False, False), ("", True, True), ("0", True, False), (" OFF ", True, False),
    ("no", True, False), ("false", True, False), ("1", False, True), ("Yes", False, True), ("on", False, True),
    ("maybe", True, True), ("maybe", False, False),
])
def test_env_switch(monkeypatch, value, default, want):
    if value is None:
        monkeypatch.delenv("DP_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DP_TEST_SWITCH", value)
    if value == "maybe":  # not an on/off value: the default, with a warning naming the variable
        with pytest.warns(RuntimeWarning, match="DP_TEST_SWITCH='maybe'"):
            assert _utils.env_switch("DP_TEST_SWITCH", default) is want
    else:
        assert _utils.env_switch("DP_TEST_SWITCH", default) is want
