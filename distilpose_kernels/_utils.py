"""Shared plumbing for the op library: backend selection, input checks, NVTX.

Nothing here touches the GPU or imports Triton at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import time
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

F = TypeVar("F", bound=Callable)

#: Set to 1 to make every op use its pure-PyTorch reference, on any device.
FORCE_REFERENCE_ENV = "DISTILPOSE_FORCE_REFERENCE"
#: Set to 1 (before import) to wrap ops and model stages in NVTX ranges.
NVTX_ENV = "DISTILPOSE_NVTX"

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off", "")


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable: "1"/"true"/"yes"/"on" and "0"/"false"/"no"/"off" (any
    case, surrounding spaces ignored); unset or empty gives ``default``. Anything else gives
    ``default`` with a RuntimeWarning naming the variable (never silently ignored)."""
    v = os.environ.get(name)
    if v is None:
        return default
    s = v.strip().lower()
    if s in _ON:
        return True
    if s in _OFF:
        return default if s == "" else False
    warnings.warn(f"{name}={v!r} is not an on/off value (expected one of 1/true/yes/on or 0/false/no/off); "
                  f"using the default ({'on' if default else 'off'})", RuntimeWarning, stacklevel=3)
    return default


def contiguous_vectors(*tensors: Optional[torch.Tensor]) -> tuple:
    """1-D kernel parameters (biases, LayerNorm weights) as the kernels read them, contiguous: a
    strided view (which the input checks accept) is copied; None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


# Pure-Python launch arithmetic: triton.cdiv / triton.next_power_of_2 are constexpr functions in
# recent Triton and cost microseconds per host call, which adds up on every launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def force_reference() -> bool:
    """True when DISTILPOSE_FORCE_REFERENCE asks for the reference paths (read per call)."""
    return env_switch(FORCE_REFERENCE_ENV, False)


_TRITON_FOUND: Optional[bool] = None


def triton_available() -> bool:
    """Whether `import triton` would work (checked once, without importing it).

    A plain cached global rather than lru_cache, so torch.compile reads a constant.
    """
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        try:
            _TRITON_FOUND = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None to disable it
            _TRITON_FOUND = False
    return _TRITON_FOUND


def lazy_module(name: str) -> Callable[[], object]:
    """A loader that imports ``name`` on first call and then returns it from a cell.

    The Triton kernel modules import triton, so ops load them only on the Triton path; the
    cached loader keeps the import machinery off the per-call path.
    """
    cell: list = []

    def load():
        if not cell:
            cell.append(importlib.import_module(name))
        return cell[0]

    return load


def triton_interpret() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return env_switch("TRITON_INTERPRET", False)


def select_triton_backend(op: str, tensors: Sequence[torch.Tensor], backend: Optional[str],
                          dtypes: Optional[Sequence[torch.dtype]] = None, name: str = "x") -> str:
    """Resolve ``backend`` to "triton" or "reference" for a Triton-backed op.

    ``None``/"auto": Triton when every tensor is on CUDA, Triton is installed and
    the force-reference variable is unset; otherwise the reference.
    "triton": always the Triton kernel (on CPU tensors only under TRITON_INTERPRET=1).
    ``dtypes``: the kernels' dtypes for ``tensors[0]`` (the argument called ``name``): another
    dtype makes "auto" pick the reference and "triton" raise a TypeError.
    """
    which = _select_triton_backend(op, tensors, backend)
    if which == "triton" and dtypes is not None and tensors[0].dtype not in dtypes:
        if backend == "triton":
            raise TypeError(f"{name}: backend='triton' does not support dtype {tensors[0].dtype}; "
                            "use backend='reference'")
        return "reference"
    return which


def _select_triton_backend(op: str, tensors: Sequence[torch.Tensor], backend: Optional[str]) -> str:
    backend = "auto" if backend is None else backend
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"{op}: backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but Triton is not installed")
        if any(not t.is_cuda for t in tensors) and not triton_interpret():
            raise RuntimeError(
                f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the "
                "kernels are first used"
            )
        return "triton"
    if force_reference() or not triton_available():
        return "reference"
    for t in tensors:
        if not t.is_cuda:
            return "reference"
    return "triton"


# ----------------------------------------------------------------------------- fp32 dot precision

#: How the Triton kernels multiply float32 operands: "auto" (default), "ieee" or "tf32x3".
FP32_DOT_ENV = "DISTILPOSE_FP32_DOT"
_FP32_DOT_CHOICES = ("auto", "ieee", "tf32x3")
_TF32_CORES: dict = {}  # CUDA device index -> compute capability >= 8.0
# the C getter behind torch.backends.cuda.matmul.allow_tf32 (6x cheaper than the module lookup,
# which every fp32 attention / GEMM launch pays); the public attribute where it is missing
_CUBLAS_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def _matmul_allows_tf32() -> bool:
    return _CUBLAS_TF32() if _CUBLAS_TF32 is not None else bool(torch.backends.cuda.matmul.allow_tf32)


def fp32_dot_precision(device: torch.device) -> str:
    """``input_precision`` of ``tl.dot`` on float32 operands in this library's Triton kernels.

    - "tf32" when torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``): the
      user traded fp32 accuracy for speed, as cuBLAS then does;
    - otherwise ``DISTILPOSE_FP32_DOT`` when set to "ieee" (FMA dots) or "tf32x3";
    - "auto": "tf32x3" on GPUs with TF32 tensor cores (compute capability 8.0 and up), "ieee"
      elsewhere. 3xTF32 splits each operand into a TF32 head and a TF32 tail and sums three
      tensor-core products in fp32 (hi*hi + hi*lo + lo*hi): the dropped lo*lo term is about
      2^-22 of each product, below fp32 GEMM rounding at these inner sizes
      (``tests/test_mlp.py`` measures the method against float64 and cuBLAS-style fp32).
    """
    choice = os.environ.get(FP32_DOT_ENV, "auto").strip().lower() or "auto"
    if choice not in _FP32_DOT_CHOICES:
        raise ValueError(f"{FP32_DOT_ENV}: expected one of {', '.join(_FP32_DOT_CHOICES)}, got {choice!r}")
    if _matmul_allows_tf32():
        return "tf32"
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "ieee"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cores = _TF32_CORES.get(index)
    if cores is None:
        cores = _TF32_CORES[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return "tf32x3" if cores else "ieee"


# ----------------------------------------------------------------------------- timed choice


def agrees_at_dtype(got: torch.Tensor, ref: torch.Tensor, tol16: float, tol32: float) -> bool:
    """``got`` equals ``ref`` up to rounding: the largest difference is within ``tol`` of the
    output's scale (tol16 for fp16/bf16, tol32 otherwise), computed in the outputs' own dtype
    (no float32 copies of large activations). Shape and dtype must match."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    tol = tol16 if ref.dtype in (torch.float16, torch.bfloat16) else tol32
    return float((got - ref).abs().max()) <= tol * float(ref.abs().max()) + 1e-6


#: set inside ``timing_for_cuda_graphs()``: the "auto" choices made there are timed on device time
_GRAPH_TIMING: contextvars.ContextVar = contextvars.ContextVar("distilpose_graph_timing", default=False)
#: per device index: cycles of ``torch.cuda._sleep`` per millisecond (measured once)
_SPIN_CYCLES_PER_MS: dict = {}
#: longest GPU spin used to hide host time (ms)
_MAX_SPIN_MS = 50.0


@contextlib.contextmanager
def timing_for_cuda_graphs():
    """Inside this context the ops' "auto" backends decide on device time alone.

    Outside it they time each path per call, host time included: right for eager calls, but at
    small sizes a Triton kernel's launch path then outweighs its device time, and "auto" keeps
    the unfused ops even where a CUDA graph (which replays no host work) would run the fused
    kernel faster. Warm up and capture a graph inside this context (``capture_cuda_graph`` does);
    its decisions are cached apart from the per-call ones.
    """
    token = _GRAPH_TIMING.set(True)
    try:
        yield
    finally:
        _GRAPH_TIMING.reset(token)


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3, pool=None,
                       device: Optional[torch.device] = None, pdl: Optional[object] = None) -> tuple:
    """``fn()`` captured in a CUDA graph -> (graph, the captured output).

    ``warmup`` calls first run on a side stream (compilation, autotuning, cuDNN/cuBLAS handles,
    the ops' "auto" choices); warm-up and capture run inside ``timing_for_cuda_graphs()``, so
    those choices are made on device time, as the graph will run. ``pool``: a graph memory
    pool to share (``torch.cuda.graph_pool_handle()``). Replaying overwrites the output.

    ``pdl``: programmatic dependent launch of this library's Triton kernels in the graph
    (``programmatic_launch``). None: as the caller's context or ``DISTILPOSE_PDL`` says;
    True / False: on / off; "auto": where ``pdl_supported``, the graph is captured both ways and
    the PDL graph is kept only if its outputs are bit-identical to the other's (which must repeat
    itself bit for bit) and its replay is faster (device time); any failure of the PDL capture
    keeps the other graph. The decision is recorded (``auto_choices``).
    """
    if pdl == "auto":
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if pdl_supported(dev):
            return _capture_pdl_auto(fn, warmup, pool, dev)
        pdl = False
    elif pdl not in (None, True, False):
        raise ValueError(f"pdl: expected None, True, False or 'auto', got {pdl!r}")
    ctx = contextlib.nullcontext() if pdl is None else programmatic_launch(pdl)
    with timing_for_cuda_graphs(), ctx:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
        finally:  # a warm-up that raises leaves no kernels running unordered with the caller's stream
            torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


#: ``auto_choices``' name of the graph-level PDL decision
PDL_DECISION = "capture_cuda_graph: programmatic dependent launch"


def _bits(t: object) -> object:
    """A tensor's bytes (NaNs compare equal to themselves, -0.0 differs from 0.0)."""
    return t.contiguous().view(torch.uint8) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _same_outputs(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(
        torch.equal(_bits(x), _bits(y)) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _capture_pdl_auto(fn: Callable[[], object], warmup: int, pool, device) -> tuple:
    """``capture_cuda_graph(pdl="auto")`` on a PDL-capable device."""
    graph, out = capture_cuda_graph(fn, warmup, pool, device, pdl=False)
    outs = _as_tuple(out)
    key = tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))
    with torch.cuda.device(device):
        caller_stream = torch.cuda.current_stream()
        graph.replay()
        ref = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        graph.replay()
        if not _same_outputs(outs, ref):  # nothing to compare the PDL graph with
            _record(PDL_DECISION, key, False, "not deterministic without it", timing="device")
            return graph, out
        try:
            graph_pdl, out_pdl = capture_cuda_graph(fn, 1, pool, device, pdl=True)
            graph_pdl.replay()
            torch.cuda.synchronize()
            if not _same_outputs(_as_tuple(out_pdl), ref):
                warnings.warn("capture_cuda_graph: the graph with programmatic dependent launch gave other outputs "
                              "than without it; keeping the graph without it")
                _record(PDL_DECISION, key, False, "disagrees", timing="device")
                return graph, out
            t_off = t_on = float("inf")
            for _ in range(2):  # alternated: clock or thermal drift does not favour one
                t_off = min(t_off, cuda_time_ms(graph.replay, device_only=True))
                t_on = min(t_on, cuda_time_ms(graph_pdl.replay, device_only=True))
        except Exception as e:  # noqa: BLE001 - PDL is an optimisation: never fail the capture for it
            # torch.cuda.graph leaves its capture stream current when ending a capture fails
            torch.cuda.set_stream(caller_stream)
            torch.cuda.synchronize()
            warnings.warn(f"capture_cuda_graph: programmatic dependent launch failed ({type(e).__name__}: {e}); "
                          "keeping the graph without it")
            _record(PDL_DECISION, key, False, f"failed: {type(e).__name__}: {str(e)[:200]}", timing="device")
            return graph, out
    choice = t_on < t_off
    _record(PDL_DECISION, key, choice, "faster" if choice else "slower", t_on, t_off, timing="device")
    return (graph_pdl, out_pdl) if choice else (graph, out)


def _spin_cycles_per_ms() -> float:
    idx = torch.cuda.current_device()
    rate = _SPIN_CYCLES_PER_MS.get(idx)
    if rate is None:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # first use loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rate = _SPIN_CYCLES_PER_MS[idx] = cycles / max(start.elapsed_time(end), 1e-3)
    return rate


def cuda_time_ms(fn: Callable[[], object], rounds: int = 3, reps: int = 5, device_only: bool = False) -> float:
    """Best of ``rounds`` averages of ``reps`` back-to-back calls, in ms (CUDA events), after two
    warm-up calls.

    ``device_only``: each round's calls are queued behind a GPU spin (``torch.cuda._sleep``) long
    enough for the host to enqueue them all, so the events see the kernels run back to back,
    as a CUDA graph replays them, and none of the host time between launches."""
    fn()
    fn()
    spin = 0
    if device_only:
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3  # enqueue time of one call (no sync)
        torch.cuda.current_stream().synchronize()
        spin_ms = min(_MAX_SPIN_MS, 2.0 * reps * host_ms + 0.05)
        spin = max(1, int(_spin_cycles_per_ms() * spin_ms))
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda._sleep(spin)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


#: every decision of ``timed_choice`` in this process, oldest first (see ``auto_choices``)
_DECISIONS: list = []
_MAX_DECISIONS = 1024


def auto_choices() -> list:
    """The "auto" decisions this process made, oldest first: dicts with ``op`` (the path that
    was considered), ``key`` (shape, dtype, ... as text), ``use`` ("fused" or "reference"),
    ``why`` ("faster", "slower", "disagrees" or "failed: ..."), ``timing`` ("call": per call,
    host time included; "device": inside ``timing_for_cuda_graphs()``) and, when timed,
    ``fused_ms`` and ``reference_ms``. Shows which fused ops a model actually runs on this machine."""
    return [dict(d) for d in _DECISIONS]


#: the kernel modules whose GPU autotuners ``tuned_configs`` reports (only those already imported)
_TUNED_MODULES = ("mlp_triton", "attention_triton", "conv_epilogue_triton", "heatmap_triton", "multiscale_triton",
                  "keypoints_triton")


def tuned_configs() -> dict:
    """The tiles the Triton autotuners picked in this process: {"module.tuner": {key: config}}
    (key: the sizes and constexprs it was tuned for, config: block sizes, warps, stages, as
    text). Only kernel modules already imported are read, so this imports no Triton; empty on
    machines without a GPU (no autotuning there). With ``auto_choices`` it shows what a model
    actually runs, e.g. whether the batch-1 split tiles won."""
    import sys

    out: dict = {}
    for name in _TUNED_MODULES:
        mod = sys.modules.get(f"{__package__}.{name}")
        if mod is None:
            continue
        for attr, val in vars(mod).items():
            tuners = val.items() if isinstance(val, dict) else [(None, val)]
            for sub, t in tuners:
                cache = getattr(t, "cache", None)
                if not isinstance(cache, dict) or not hasattr(t, "configs") or not cache:
                    continue
                label = f"{name}.{attr}" + (f"[{sub}]" if sub is not None else "")
                out[label] = {str(k): str(v) for k, v in cache.items()}
    return out


def _record(what: str, key, choice: bool, why: str, fused_ms=None, reference_ms=None, timing: str = "call") -> None:
    if len(_DECISIONS) >= _MAX_DECISIONS:
        del _DECISIONS[0]
    _DECISIONS.append({"op": what, "key": str(key), "use": "fused" if choice else "reference", "why": why,
                       "fused_ms": fused_ms, "reference_ms": reference_ms, "timing": timing})


def graph_timing() -> bool:
    """Whether the caller is inside ``timing_for_cuda_graphs()`` (decisions on device time)."""
    return _GRAPH_TIMING.get()


def decision_key(key: tuple, device_time: bool) -> tuple:
    """The key under which ``timed_choice`` caches a decision for ``key``: decisions timed on
    device time (inside ``timing_for_cuda_graphs()``) are kept apart from per-call ones."""
    return (key, "device time") if device_time else key


def timed_choice(cache: dict, key: tuple, fused: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor],
                 agrees: Callable[[torch.Tensor, torch.Tensor], bool], what: str) -> bool:
    """Whether an op's "auto" backend runs its fused path for ``key`` (cached in ``cache``).

    Decided once: the fused path must agree with the reference on this input (``agrees``, per
    output when the paths return tuples) and be faster (``cuda_time_ms``). A failure or a
    disagreement warns (``what`` names the path, e.g. "conv2d_relu: the fused cuDNN op") and
    picks the reference. Nothing is decided (the reference runs, nothing is cached) inside a
    CUDA-graph capture or on non-finite outputs, where the two paths may legitimately differ
    (e.g. NaN through a fused ReLU). Each decision is recorded (``auto_choices``). Inside
    ``timing_for_cuda_graphs()`` the paths are timed on device time and the decision is cached
    under its own key (``(key, "device time")``).
    """
    device_timing = graph_timing()
    key = decision_key(key, device_timing)
    choice = cache.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        return False
    timing = "device" if device_timing else "call"
    try:
        ref = _as_tuple(reference())
        if not all(bool(torch.isfinite(r).all()) for r in ref):
            return False
        got = _as_tuple(fused())
        if len(got) != len(ref) or not all(agrees(g, r) for g, r in zip(got, ref)):
            warnings.warn(f"{what} disagrees with the reference for {key}; using the reference")
            choice = False
            _record(what, key, choice, "disagrees", timing=timing)
        else:
            # timed on the outputs' device: its current stream and events (not the current device's)
            dev = next((r.device for r in ref if r.device.type == "cuda"), None)
            with torch.cuda.device(dev) if dev is not None else contextlib.nullcontext():
                t_fused = cuda_time_ms(fused, device_only=device_timing)
                t_ref = cuda_time_ms(reference, device_only=device_timing)
            choice = t_fused < t_ref
            _record(what, key, choice, "faster" if choice else "slower", t_fused, t_ref, timing=timing)
    except Exception as e:  # noqa: BLE001 - the fused path is an optimisation: never fail the call for it
        warnings.warn(f"{what} failed for {key} ({type(e).__name__}: {e}); using the reference")
        choice = False
        _record(what, key, choice, f"failed: {type(e).__name__}: {str(e)[:200]}", timing=timing)
    cache[key] = choice
    return choice


# ----------------------------------------------------------------------------- split-kernel counters

#: set by ``split_counters``: the zeroed int32 buffer the split kernels count in (None: a new one per call)
SPLIT_COUNTS: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("distilpose_split_counts",
                                                                                      default=None)


@contextlib.contextmanager
def split_counters(counts: Optional[torch.Tensor]) -> Iterator[None]:
    """Inside, the split kernels (the small-launch tiles of ``linear`` / ``linear_gelu`` /
    ``linear_add_norm`` / ``fused_mlp(_add_norm)`` and the split-key ``token_attention``
    forward, on CUDA) count their programs in ``counts`` (a zeroed 1-D int32 tensor; every kernel
    leaves it at zero) instead of in a new zeroed tensor per call: no fill kernel per call, or per
    node of a CUDA graph captured inside. Calls that need more counters than ``counts`` holds,
    or run on another device, still get their own.

    The caller guarantees that no two launches use ``counts`` at once: one stream at a time, and
    no two graphs captured with it replayed concurrently (``InferenceEngine`` keeps one per
    engine, whose graphs and static buffers are not reentrant either). ``None``: no change.
    """
    if counts is not None:
        check_tensor("counts", counts, ndim=1, dtypes=(torch.int32,))
        if not counts.is_contiguous():
            raise ValueError("counts: expected a contiguous tensor")
    token = SPLIT_COUNTS.set(counts)
    try:
        yield
    finally:
        SPLIT_COUNTS.reset(token)


def zeroed_counts(n: int, device: torch.device) -> torch.Tensor:
    """n zeroed int32 counters for a split kernel: a slice of the ``split_counters`` buffer when
    one is set (on this device, large enough), else a new tensor (a fill)."""
    shared = SPLIT_COUNTS.get()
    if shared is not None and shared.device == torch.device(device) and shared.numel() >= n:
        return shared[:n]
    return torch.zeros(n, device=device, dtype=torch.int32)


# ----------------------------------------------------------------------------- programmatic dependent launch

#: on/off: launch the forward Triton kernels with programmatic dependent launch (sm_90+) where no
#: ``programmatic_launch`` block says otherwise; read once, at the first launch. Default off:
#: ``InferenceEngine`` decides per CUDA graph, by timing and comparing the graph with and without it.
PDL_ENV = "DISTILPOSE_PDL"
_PDL: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("distilpose_pdl", default=None)
_PDL_DEFAULT: Optional[bool] = None  # DISTILPOSE_PDL once read
_PDL_SUPPORTED: dict = {}  # torch.device -> pdl_supported (a dict lookup: this runs on every launch)
#: the launch arguments of a PDL-capable kernel, on and off (shared: never mutate)
_PDL_ON = {"USE_PDL": True, "launch_pdl": True}
_PDL_OFF = {"USE_PDL": False}


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    """Triton 3.3+: ``launch_pdl`` among the CUDA launch options and ``tl.extra.cuda.gdc_wait``."""
    try:
        import dataclasses

        import triton.language.extra.cuda as tl_cuda
        from triton.backends.nvidia.compiler import CUDAOptions

        return (hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")
                and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)})
    except Exception:  # noqa: BLE001 - no (NVIDIA) Triton: no PDL
        return False


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch: a CUDA device of
    compute capability 9.0+ (Hopper), compiled kernels (not TRITON_INTERPRET) and a Triton with
    ``launch_pdl`` (3.3+). Decided once per device."""
    ok = _PDL_SUPPORTED.get(device)
    if ok is None:
        ok = device.type == "cuda" and not triton_interpret() and _triton_has_pdl()
        if ok:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            ok = torch.cuda.get_device_capability(idx)[0] >= 9
        _PDL_SUPPORTED[device] = ok
    return ok


@contextlib.contextmanager
def programmatic_launch(enabled: bool = True) -> Iterator[None]:
    """Inside, the forward Triton kernels (``linear`` / ``linear_gelu`` / ``linear_add_norm`` /
    ``fused_mlp(_add_norm)``, ``token_attention`` / ``qkv_attention`` / ``add_pos_layernorm``,
    ``conv2d_relu``'s Triton kernel, ``regression_head``, ``regression_to_image``,
    ``upsample_sum``) launch with programmatic dependent launch where ``pdl_supported``
    (``enabled=False``: without it, whatever ``DISTILPOSE_PDL`` says).

    Each such kernel may then be scheduled while the previous kernel in the stream still runs;
    its programs first wait for that kernel's completion and memory (``griddepcontrol.wait``),
    before any load or store, and then let the next kernel launch. What it saves is the launch
    gap between small dependent kernels (batch-1 inference); a CUDA graph captured inside keeps
    the programmatic edges. Kernels of other libraries launch as before.
    """
    token = _PDL.set(bool(enabled))
    try:
        yield
    finally:
        _PDL.reset(token)


def pdl_requested() -> bool:
    """Whether programmatic dependent launch is asked for here: the innermost
    ``programmatic_launch`` block, else ``DISTILPOSE_PDL`` (read once). The compiled extension's
    loss kernels take this as their ``pdl`` argument and check the device themselves."""
    global _PDL_DEFAULT
    on = _PDL.get()
    if on is None:
        on = _PDL_DEFAULT
        if on is None:
            on = _PDL_DEFAULT = env_switch(PDL_ENV, False)
    return on


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords of a PDL-capable Triton kernel on ``device``: its ``USE_PDL`` constexpr
    and, when on (``pdl_requested`` and ``pdl_supported``), Triton's ``launch_pdl=True``."""
    return _PDL_ON if pdl_requested() and pdl_supported(device) else _PDL_OFF


# ----------------------------------------------------------------------------- checks


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    floating: bool = False,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    finite: bool = False,
) -> torch.Tensor:
    """Validate one argument and raise a clear error naming it.

    ``shape`` entries of ``None`` match any size. ``device`` must match exactly
    (type and index). ``finite`` rejects NaN/inf (costs a reduction: use it only
    where the NaN policy says so).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors must share one device; returns it."""
    items = list(tensors.items())
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n}: expected a tensor on {dev} (like {items[0][0]}), got one on {t.device}")
    return dev


# ----------------------------------------------------------------------------- NVTX


def nvtx_enabled() -> bool:
    return env_switch(NVTX_ENV, False)


def annotate(name: str) -> Callable[[F], F]:
    """Decorator: wrap ``fn`` in an NVTX range named ``name`` when DISTILPOSE_NVTX=1.

    Evaluated once, at decoration time: when NVTX is off the function is returned
    unchanged, so the off path costs nothing (no extra Python call).
    """

    def deco(fn: F) -> F:
        if not nvtx_enabled():
            return fn
        try:
            import nvtx  # type: ignore
        except ImportError:  # pragma: no cover - nvtx is a declared dependency
            return fn

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with nvtx.annotate(name, domain="distilpose"):
                return fn(*args, **kwargs)

        wrapped.__nvtx_name__ = name  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    return deco
