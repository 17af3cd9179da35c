"""Programmatic dependent launch (PDL) of the forward Triton kernels: the switch (context,
environment, device support), the sm_90 compile of every PDL-capable kernel (griddepcontrol
before its first memory access), ``capture_cuda_graph(pdl="auto")``'s decision with stand-in
graphs, the engine option; on a Hopper GPU, the kernels with and without PDL give bit-identical
results, eagerly and in CUDA graphs, and the engine's timed choice."""
from __future__ import annotations

import contextlib

import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import _utils

ON = {"USE_PDL": True, "launch_pdl": True}
OFF = {"USE_PDL": False}
CUDA0 = torch.device("cuda", 0)


def _env(monkeypatch, value):
    """Set DISTILPOSE_PDL (None: unset) and forget the value read at the first launch."""
    if value is None:
        monkeypatch.delenv(dk.PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(dk.PDL_ENV, value)
    monkeypatch.setattr(_utils, "_PDL_DEFAULT", None)


def test_pdl_is_off_on_cpu_whatever_asks_for_it(monkeypatch):
    _env(monkeypatch, "1")
    cpu = torch.device("cpu")
    assert not dk.pdl_supported(cpu)
    assert _utils.pdl_launch(cpu) == OFF
    with dk.programmatic_launch(True):
        assert _utils.pdl_launch(cpu) == OFF


def test_pdl_switch_context_over_environment(monkeypatch):
    monkeypatch.setattr(_utils, "pdl_supported", lambda device: True)
    _env(monkeypatch, None)
    assert _utils.pdl_launch(CUDA0) == OFF  # off by default
    _env(monkeypatch, "1")
    assert _utils.pdl_launch(CUDA0) == ON
    monkeypatch.setenv(dk.PDL_ENV, "0")  # read once, at the first launch
    assert _utils.pdl_launch(CUDA0) == ON
    with dk.programmatic_launch(False):
        assert _utils.pdl_launch(CUDA0) == OFF
        with dk.programmatic_launch(True):
            assert _utils.pdl_launch(CUDA0) == ON
        assert _utils.pdl_launch(CUDA0) == OFF
    assert _utils.pdl_launch(CUDA0) == ON
    _env(monkeypatch, "0")
    with dk.programmatic_launch():
        assert _utils.pdl_launch(CUDA0) == ON
    assert _utils.pdl_launch(CUDA0) == OFF
    _env(monkeypatch, "sometimes")
    with pytest.warns(RuntimeWarning, match=dk.PDL_ENV):
        assert _utils.pdl_launch(CUDA0) == OFF


def test_pdl_needs_hopper_compiled_kernels_and_a_triton_with_it(monkeypatch):
    def supported(capability, interpret=False, has_pdl=True):
        monkeypatch.setattr(_utils, "_PDL_SUPPORTED", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: capability)
        monkeypatch.setattr(_utils, "triton_interpret", lambda: interpret)
        monkeypatch.setattr(_utils, "_triton_has_pdl", lambda: has_pdl)
        return _utils.pdl_supported(CUDA0)

    assert supported((9, 0)) and supported((10, 0))
    assert not supported((8, 0))  # Ampere: no griddepcontrol
    assert not supported((9, 0), interpret=True)
    assert not supported((9, 0), has_pdl=False)
    assert not _utils.pdl_supported(torch.device("cpu"))
    monkeypatch.setattr(_utils, "_PDL_SUPPORTED", {CUDA0: True})  # decided once per device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (8, 0))
    assert _utils.pdl_supported(CUDA0)


def test_this_triton_has_pdl():
    pytest.importorskip("triton")
    _utils._triton_has_pdl.cache_clear()
    assert _utils._triton_has_pdl()  # Triton 3.3+ (the supported range is 3.6 to 3.9)


# ----------------------------------------------------------------------------- sm_90 compile (no GPU needed)

_AOT = r'''
import distilpose_kernels.attention_triton as at
import distilpose_kernels.conv_epilogue_triton as ct
import distilpose_kernels.heads_triton as ht
import distilpose_kernels.keypoints_triton as kt
import distilpose_kernels.mlp_triton as mt
import distilpose_kernels.multiscale_triton as ms

MEMORY_OPS = ("ld.global", "st.global", "atom.", "red.", "cp.async", "ldmatrix", "ld.shared", "st.shared")
f, p = "*fp32", "*fp32"
ptrs = lambda names, t=p: {n: t for n in names}  # noqa: E731
cases = {
    "linear": (mt._linear_gelu_kernel, dict(X=p, Wt=p, B=p, Y=p, WS=f, CNT="*i32"), {},
               dict(HAS_B=True, GELU=True, PRECISION="tf32x3", UPCAST=False, GROUP_M=8,
                    **mt._gemm_config(mt.SPLIT_TILES[0])), {}),
    "linear_add_norm": (mt._linear_add_norm_kernel, ptrs(("X", "Wt", "B", "RES", "POS", "LNW", "LNB", "XO", "Y")),
                        dict(eps="fp32", WS=f, CNT="*i32"),
                        dict(HAS_BIAS=True, HAS_POS=True, HAS_W=True, HAS_B=True, PRECISION="tf32x3", UPCAST=False,
                             BLOCK_N=256, **mt._add_norm_config(mt.ADD_NORM_SPLIT_TILES[0])), {}),
    "mlp": (mt._mlp_kernel, ptrs(("X", "W1", "B1", "W2", "B2", "Y", "RES", "POS", "LNW", "LNB", "XO")),
            dict(eps="fp32", WS=f, CNT="*i32"),
            dict(HAS_B1=True, HAS_B2=True, ADD_NORM=True, HAS_POS=True, HAS_W=True, HAS_B=True, PRECISION="tf32x3",
                 UPCAST=False, BLOCK_K=64, BLOCK_N=256, **mt._mlp_config(mt.MLP_SPLIT_TILES[0])), {}),
    "attention": (at._attn_fwd_kernel, dict(QKV=p, Out=p, LSE=f, WS=f, WML=f, CNT="*i32"), dict(qk_scale="fp32"),
                  dict(HEAD_DIM=24, BLOCK_D=32, BLOCK_M=64, BLOCK_N=64, PRECISION="tf32x3", UPCAST=False, SPLIT=2),
                  dict(num_warps=4, num_stages=3)),
    "qkv_attention": (at._qkv_attn_fwd_kernel, dict(X=p, Wt=p, Bias=p, Out=p), dict(qk_scale="fp32"),
                      dict(HAS_BIAS=True, HEAD_DIM=24, BLOCK_D=32, BLOCK_M=32, BLOCK_N=32, BLOCK_C=32,
                           PRECISION="tf32x3", UPCAST=False), dict(num_warps=4, num_stages=1)),
    "add_pos_layernorm": (at._apln_fwd_kernel, dict(X=p, POS=p, W=p, B=p, XO=p, Y=p, Mean=f, Rstd=f, RES=p),
                          dict(eps="fp32"), dict(HAS_W=True, HAS_B=True, HAS_POS=True, HAS_RES=True, BLOCK_R=16,
                                                 BLOCK_C=256), {}),
    "conv2d_relu": (ct._small_conv_relu_kernel, dict(X=p, Wt=p, B=p, R=p, Y=p), {},
                    dict(KH=3, KW=3, HAS_B=True, HAS_R=True, PRECISION="tf32x3", UPCAST=False, BLOCK_P=64,
                         BLOCK_CO=64, BLOCK_K=16), dict(num_warps=4, num_stages=2)),
    "regression_head": (ht._regression_head_kernel, dict(X=p, LNW=p, LNB=p, FW=p, FB=p, Y=f), dict(eps="fp32"),
                        dict(BLOCK_R=ht.BLOCK_R, BLOCK_D=256), {}),
    "regression_to_image": (kt._regression_to_image_kernel,
                            dict(C=p, S=p, FC=p, FS=p, PERM="*i64", CEN=f, SCA=f, ROT=f, KP=f, SC=f), {},
                            dict(FLIP=True, HAS_ROT=True, BLOCK=kt.BLOCK), {}),
    "upsample_sum": (ms._upsample_sum_kernel, dict(BASE=p, OUT=p, T0=p, T1=p, T2=p), {},
                     dict(NT=3, CL=True, RELU=True, BLOCK_A=16, BLOCK_B=64), {}),
}
for name, (fn, kptrs, scalars, consts, opts) in cases.items():
    if NAMES and name not in NAMES:
        continue
    for on in (False, True):
        ptx = compile_(fn, kptrs, scalars, dict(consts, USE_PDL=on), **opts).asm["ptx"]
        wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
        if not on:
            assert wait < 0 and launch < 0, (name, "griddepcontrol without USE_PDL")
            continue
        assert 0 <= wait < launch, (name, wait, launch)
        first = min(i for i in (ptx.find(op) for op in MEMORY_OPS) if i >= 0)
        assert wait < first, (name, "a memory access before griddepcontrol.wait", ptx[first:first + 80])
'''


@pytest.mark.slow
def test_pdl_kernels_compile_for_sm90_and_wait_before_any_memory_access():
    """Every PDL-capable kernel, compiled for sm_90 with USE_PDL: the PTX waits for the previous
    grid (griddepcontrol.wait) before its first global or shared memory access and only then lets
    the next grid launch; without USE_PDL neither instruction is emitted."""
    pytest.importorskip("triton")
    from sm90 import compile_for_sm90

    compile_for_sm90("NAMES = ()\n" + _AOT)


@pytest.mark.gpu
def test_gpu_this_triton_waits_before_any_memory_access():
    """The same check with the GPU machine's Triton (the supported range starts at 3.6, whose
    gdc_wait may lower differently from the CPU machine's), on the TDE's kernels."""
    from sm90 import compile_for_sm90

    compile_for_sm90("NAMES = ('linear', 'linear_add_norm', 'attention', 'qkv_attention')\n" + _AOT)


# ----------------------------------------------------------------------------- capture_cuda_graph(pdl="auto")


class _FakeGraph:
    """A stand-in CUDA graph: each replay() writes the next of ``values`` into its output."""

    def __init__(self, out: torch.Tensor, values, pdl: bool):
        self.out, self.values, self.pdl, self.replays = out, values, pdl, 0

    def replay(self):
        self.out.fill_(self.values[self.replays % len(self.values)])
        self.replays += 1


@pytest.fixture
def fake_graphs(monkeypatch):
    """``set(values, times, fail)``: captures give _FakeGraphs whose replays write
    ``values[pdl]`` (a sequence, cycled) and take ``times[pdl]`` ms; ``fail``: the PDL capture
    raises. ``state["streams"]``: the streams ``torch.cuda.set_stream`` was given."""
    state = {"streams": []}

    def capture(fn, warmup=3, pool=None, device=None, pdl=None):
        if pdl and state["fail"]:
            raise RuntimeError("no programmatic edges in graphs here")
        out = torch.zeros(2, 3)
        return _FakeGraph(out, state["values"][bool(pdl)], bool(pdl)), out

    def set_(values=((1.0,), (1.0,)), times=(2.0, 1.0), fail=False):
        state.update(values=values, times=times, fail=fail)
        return state

    monkeypatch.setattr(_utils, "capture_cuda_graph", capture)
    monkeypatch.setattr(_utils, "cuda_time_ms",
                        lambda fn, rounds=3, reps=5, device_only=False: state["times"][fn.__self__.pdl])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller stream")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: state["streams"].append(stream))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_utils, "_DECISIONS", [])
    return set_


NAN = float("nan")


@pytest.mark.parametrize("values,times,fail,pdl_kept,why", [
    (((1.0,), (1.0,)), (2.0, 1.0), False, True, "faster"),
    (((1.0,), (1.0,)), (1.0, 2.0), False, False, "slower"),
    (((NAN,), (NAN,)), (2.0, 1.0), False, True, "faster"),  # NaN outputs: the same bits
    (((1.0,), (1.5,)), (2.0, 1.0), False, False, "disagrees"),
    (((1.0, 2.0), (1.0,)), (2.0, 1.0), False, False, "not deterministic without it"),
    (((1.0,), (1.0,)), (2.0, 1.0), True, False, "failed: RuntimeError"),
], ids=["faster", "slower", "nan", "disagrees", "nondeterministic", "fails"])
def test_capture_pdl_auto_keeps_the_pdl_graph_only_when_identical_and_faster(fake_graphs, values, times, fail,
                                                                             pdl_kept, why):
    state = fake_graphs(values, times, fail)
    if why in ("disagrees",) or why.startswith("failed"):
        with pytest.warns(UserWarning, match="programmatic dependent launch"):
            graph, out = _utils._capture_pdl_auto(lambda: None, 3, None, None)
    else:
        graph, out = _utils._capture_pdl_auto(lambda: None, 3, None, None)
    assert graph.pdl is pdl_kept and out is graph.out
    (d,) = dk.auto_choices()
    assert d["op"] == _utils.PDL_DECISION and d["key"] == str(((2, 3),)) and d["timing"] == "device"
    assert d["use"] == ("fused" if pdl_kept else "reference") and d["why"].startswith(why)
    if why in ("faster", "slower"):
        assert (d["fused_ms"], d["reference_ms"]) == (times[1], times[0])
    # a failed capture leaves torch's capture stream current: the caller's is restored
    assert state["streams"] == (["caller stream"] if fail else [])


def test_capture_cuda_graph_pdl_argument(monkeypatch):
    with pytest.raises(ValueError, match="pdl: expected None, True, False or 'auto'"):
        dk.capture_cuda_graph(lambda: None, pdl="yes")
    seen = []
    monkeypatch.setattr(_utils, "pdl_supported", lambda device: True)
    monkeypatch.setattr(_utils, "_capture_pdl_auto", lambda *a: seen.append(a) or ("graph", "out"))
    assert dk.capture_cuda_graph(len, 2, "pool", CUDA0, pdl="auto") == ("graph", "out")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dk.capture_cuda_graph(len, 2, "pool", pdl="auto") == ("graph", "out")  # the current device
    assert seen == [(len, 2, "pool", CUDA0)] * 2


# ----------------------------------------------------------------------------- the engine option


def test_engine_pdl_option_sets_the_launch_context_of_its_step():
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_tiny").eval()
    with pytest.raises(ValueError, match="pdl: expected None, True or False"):
        InferenceEngine(model, device="cpu", pdl="on")
    crops = torch.randn(1, 3, 256, 192)
    results = {}
    for pdl in (None, True, False):
        eng = InferenceEngine(model, device="cpu", pdl=pdl)
        seen = []
        step = eng._step
        eng._step = lambda *a, step=step, seen=seen: seen.append(_utils._PDL.get()) or step(*a)
        results[pdl] = eng(crops)["keypoints"]
        assert seen == [pdl] and f"pdl={pdl}" in repr(eng)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)
    torch.testing.assert_close(results[None], results[False], rtol=0, atol=0)


# ----------------------------------------------------------------------------- on a Hopper GPU


def _needs_hopper():
    if not torch.cuda.is_available() or not dk.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs an sm_90+ GPU and compiled Triton kernels")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,precision", [("distilpose_tiny", "fp32"), ("tokenpose_tiny", "bf16")])
def test_gpu_engine_with_pdl_is_bit_identical_eager_and_in_graphs(preset, precision):
    """The batch-1 flip-test step with every forward Triton kernel launched with PDL equals the
    step without, bit for bit: eagerly, and in CUDA graphs replayed on changing inputs (a kernel
    reading before the previous one finished would differ somewhere). Small models (every
    kernel, the teacher's multi-resolution sum in bf16); DistilPose-S at the benchmark's shape
    is the next test."""
    _needs_hopper()
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    torch.manual_seed(0)
    model = build_model(preset).eval()
    center, scale = torch.tensor([[96.0, 128.0]], device="cuda"), torch.tensor([[192.0, 256.0]], device="cuda")
    for graph in (False, True):
        engines = {pdl: InferenceEngine(model, device="cuda", precision=precision, fold_bn=True, cuda_graph=graph,
                                        pdl=pdl) for pdl in (False, True)}
        for i in range(4 if graph else 2):
            x = torch.randn(1, 3, *model.input_size, device="cuda") * (1 + i)
            a, b = (engines[p](x, center, scale) for p in (False, True))
            torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=0, atol=0)
            torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_engine_pdl_auto_decides_once_per_graph_and_agrees(monkeypatch):
    """``pdl=None`` with a CUDA graph: the graph is captured with and without PDL, the outputs
    agree bit for bit ("disagrees" / "failed" would fall back, and fail here), one decision per
    captured shape, and the results equal the PDL-off engine's."""
    _needs_hopper()
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    monkeypatch.setattr(_utils, "_DECISIONS", [])
    model = build_model("distilpose_s").eval()
    auto = InferenceEngine(model, device="cuda", fold_bn=True, cuda_graph=True)
    off = InferenceEngine(model, device="cuda", fold_bn=True, cuda_graph=True, pdl=False)
    x = torch.randn(1, 3, *model.input_size, device="cuda")
    for _ in range(2):
        a, b = auto(x), off(x)
        torch.testing.assert_close(a["keypoints"], b["keypoints"], rtol=0, atol=0)
    decided = [d for d in dk.auto_choices() if d["op"] == _utils.PDL_DECISION]
    assert len(decided) == 1 and decided[0]["why"] in ("faster", "slower"), decided
    assert decided[0]["fused_ms"] > 0 and decided[0]["reference_ms"] > 0
