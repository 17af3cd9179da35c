#!/usr/bin/env python3
"""The one GPU check: build with CUDA, run the GPU tests, compute-sanitizer, the speed-goal
benchmarks, and print a goal-vs-measured table LAST.

    bash scripts/gpu_check.sh                 # on a CUDA machine (installs carried wheels first)
    python scripts/gpu_check.py --dry-run     # list the stages and their time limits
    python scripts/gpu_check.py --list-goals  # the goals and how each is found

Stages run in priority order, each in its own subprocess with a time limit; a failing or
timed-out stage never stops the rest. A global budget (``--budget``, default 520 s) keeps the
whole run under 8 minutes on an H100: every stage gets at most what is left after reserving
a minimum slice for the stages after it. Nothing here changes GPU settings (no clocks, power,
persistence or compute mode; ``nvidia-smi`` is only queried).

Output: ``gpu_check-<device>.json`` (every stage: command, status, duration, output tail;
the ceilings; the goal table) and ``gpu_check-<device>.log`` (full output), plus one
pytest-benchmark JSON per benchmark stage (``<stage>-<device>.json``), all under ``$OUT``
when set, else ``bench/results/``.

On a machine without a CUDA GPU it says so, checks what it can (every benchmark selection
below still matches cases: ``--collect-only``), and exits 0.

How goal cases are found: each benchmark stage runs ONE file with a ``-k`` expression
(``BENCH_SELECTIONS``); the goal table then reads the pytest-benchmark JSON and matches
cases on their ``extra_info`` fields (``impl``, ``batch``/``n``, ``dtype``, ``mode``, ...,
``median_s``, ``gbps``), so test names only matter for the ``-k`` selection.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PYTEST = [PY, "-m", "pytest", "-p", "no:cacheprovider"]

#: The paper's DistilPose-S speed (batch 1, fp32, flip test, one GPU).
PAPER_FPS_S = 40.2

# ----------------------------------------------------------------------------- selections
#: stage -> (benchmark file, -k expression). Keep these in step with the benchmark files:
#: the keywords are parts of their test names / parameter ids.
BENCH_SELECTIONS: Dict[str, tuple] = {
    # token attention: B=64 bf16, fwd and fwdbwd; fused vs eager einsum vs every SDPA backend (per call)
    "bench-attention": ("bench/bench_attention.py",
                        "(test_token_attention_gpu and 64 and bf16 and (fused or eager or sdpa) and not cudagraph) or "
                        "(test_add_pos_layernorm_gpu and 64 and bf16 and (fused or eager))"),
    # the TDE's GEMM fusions (info rows; the e2e stages show what they buy together), lower priority
    "bench-fusions": ("bench/bench_attention.py",
                      "(test_linear_gelu_gpu and not compile) or test_linear_fp32_gpu or "
                      "(test_fused_mlp_gpu and not compile) or test_add_norm_gpu"),
    # the batch-1 flip graph's building blocks replayed in CUDA graphs (device time): add-norm /
    # MLP / attention at 546 rows, the Bottleneck convs at batch 2 (the missed b1 goal's evidence)
    "bench-b1-graphs": (["bench/bench_attention.py", "bench/bench_conv.py"],
                        "test_add_norm_fp32_b1_graph_gpu or test_attention_fp32_b1_graph_gpu or "
                        "(test_conv2d_relu_gpu and b2_fp32 and graph)"),
    # the qkv projection inside the attention kernel vs linear + attention at the b1 flip shape, in
    # CUDA graphs (its own stage: 7 tiles x 2 dtypes to autotune; a stage cut short loses its JSON)
    "bench-qkv": ("bench/bench_attention.py", "test_qkv_attention_b1_graph_gpu"),
    # Reg2HM + score loss fwd+bwd N=256 (fused / eager / compile, fp32 teacher); targets N=64
    # (per call and in CUDA graphs: after the build, so "fused" is the extension's path when it built)
    "bench-heatmap": ("bench/bench_heatmap.py",
                      "(test_loss_fwd_bwd_gpu and 256 and fp32) or (test_targets and unbiased)"),
    # soft-argmax forward N=256 (GB/s) and DARK decode
    "bench-decode": ("bench/bench_decode.py",
                     "(test_soft_argmax_forward and 256 and (cuda or cudagraph) and not backward) or "
                     "(test_decode and 256 and cuda and dark and not compile)"),
    # the same attention and loss cases captured in CUDA graphs: device time without per-call
    # overhead (its own stage: a fault during capture cannot take the per-call cases with it)
    "bench-graphs": ("bench/bench_attention.py", "test_token_attention_gpu and 64 and bf16 and cudagraph"),
    # end to end: S batch 1 fp32 with/without flip; S batch 256 bf16; the distillation step
    "bench-e2e": ("bench/bench_e2e.py",
                  "(test_e2e_infer_b1_fp32 and distilpose_s and not cudagraph_ and not compile) or "
                  # channels-last at batch 1 (-38 us in run 5): a candidate for the goal, not a diagnostic
                  "(test_e2e_infer_b1_fp32 and distilpose_s and cudagraph_cl) or "
                  # batch 256 (met in run 8): the reference and the graph paths; the rest are diagnostics
                  "(test_e2e_infer_b256_bf16 and distilpose_s and noflip and not compile and not noepi and not nomlpk "
                  "and not plain and not fused)"),
    # the batch-1 diagnostic paths (what each fusion / layout / precision choice buys), after the goals
    "bench-e2e-variants": ("bench/bench_e2e.py",
                           "(test_e2e_infer_b1_fp32 and distilpose_s and cudagraph_ and not compile and not cudagraph_cl) or "
                           "(test_e2e_infer_b256_bf16 and distilpose_s and noflip and not compile and "
                           "(noepi or nomlpk or plain or fused))"),
    # the distillation step (its own stage and JSON: a stage cut short loses only its own cases)
    "bench-e2e-train": ("bench/bench_e2e.py", "test_e2e_train_distill"),
    # fused conv epilogue (conv + bias [+ residual] + ReLU) at DistilPose-S's Bottleneck shapes
    "bench-conv": ("bench/bench_conv.py",
                   "(test_conv2d_relu_gpu or test_upsample_sum_gpu or test_stem_conv_gpu) and not compile and not graph"),
    # lower priority: torch.compile variants of the S batch-1 case (compiles take a while)
    "bench-e2e-compile": ("bench/bench_e2e.py",
                          "test_e2e_infer_b1_fp32 and distilpose_s and withflip and compile"),
}


# ----------------------------------------------------------------------------- helpers


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:60] or "unknown"


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def device_label() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return "cpu-" + (platform.processor() or platform.machine())


def parse_pytest_summary(text: str) -> Dict[str, int]:
    """Counts from pytest's final line ('3 passed, 1 failed, 2 skipped in 4.5s')."""
    counts: Dict[str, int] = {}
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", ln)]
    if not lines:
        return counts
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)", lines[-1]):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


@dataclass
class Stage:
    name: str
    what: str
    max_s: float
    min_s: float = 20.0  # reserved for this stage while earlier stages run
    needs_gpu: bool = True
    run: Optional[Callable[["Runner", "Stage", float], Dict[str, Any]]] = None
    result: Dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, out_dir: Path, budget: float, dry_run: bool, has_gpu: bool):
        self.out_dir = out_dir
        self.budget = budget
        self.dry_run = dry_run
        self.has_gpu = has_gpu
        self.t0 = time.monotonic()
        self.device = device_label()
        self.tag = slug(self.device)
        self.log_path = out_dir / f"gpu_check-{self.tag}.log"
        self.log = None if dry_run else open(self.log_path, "w", encoding="utf-8")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.ceilings: Dict[str, float] = {}
        self.bench_files: Dict[str, str] = {}
        self.bg_build = None
        self.quick = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        if self.log:
            self.log.write(msg + "\n")
            self.log.flush()

    def sh(self, cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run ``cmd`` in its own process group; on timeout kill that group. Output goes to the log."""
        self.say(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)")
        t = time.monotonic()
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as buf:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=buf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            # at the limit: SIGINT first, so pytest finishes its session and pytest-benchmark
            # still writes the JSON of the cases that completed; then SIGTERM, then SIGKILL
            grace = min(15.0, 0.2 * timeout)
            try:
                rc = proc.wait(timeout=max(1.0, timeout - grace))
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig, wait_s in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=wait_s)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                proc.wait()
                rc = proc.returncode
            buf.seek(0)
            text = buf.read()
        if self.log:
            self.log.write(text)
            self.log.write(f"\n[rc={rc} timed_out={timed_out} {time.monotonic() - t:.1f} s]\n")
            self.log.flush()
        return {"cmd": cmd, "rc": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t, 1),
                "tail": text[-4000:], "text": text}


# ----------------------------------------------------------------------------- stages

_ENV_PROBE = textwrap.dedent(
    """
    import json, platform, sys
    info = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    except Exception as e:
        info["torch_error"] = repr(e)
    for mod in ("triton", "onnxruntime", "pytest_benchmark", "nvtx", "pycocotools"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = None
    print("ENVJSON" + json.dumps(info))
    """
)

_CEILINGS_PROBE = textwrap.dedent(
    """
    import json, torch
    dev = torch.device("cuda")
    def med(fn, n=20):
        for _ in range(3): fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        ts.sort(); return ts[len(ts) // 2]
    out = {}
    # device-to-device copy, 2 GiB, rotating between two sources (bytes read + written)
    src = [torch.rand(2**29, device=dev) for _ in range(2)]
    dst = torch.empty_like(src[0]); i = [0]
    def cp():
        i[0] ^= 1; dst.copy_(src[i[0]])
    out["copy_gbps"] = 2 * src[0].numel() * 4 / med(cp) / 1e9
    del src, dst
    for name, dt, n in (("bf16_tflops", torch.bfloat16, 8192), ("fp32_tflops", torch.float32, 8192), ("tf32_tflops", torch.float32, 8192)):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32_tflops"
        a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
        out[name] = 2 * n**3 / med(lambda: a @ b, n=10) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    print("CEILJSON" + json.dumps(out))
    """
)


def _grab_json(text: str, marker: str) -> Optional[dict]:
    for ln in reversed(text.splitlines()):
        if ln.startswith(marker):
            try:
                return json.loads(ln[len(marker):])
            except ValueError:
                return None
    return None


def stage_env(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    res = r.sh([PY, "-c", _ENV_PROBE], limit)
    info = _grab_json(res["text"], "ENVJSON") or {}
    smi = shutil.which("nvidia-smi")
    if smi:  # read-only query
        q = r.sh([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                  "--format=csv,noheader"], 15)
        info["nvidia_smi"] = q["text"].strip()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    ok = res["rc"] == 0 and "torch" in info
    return {"status": "ok" if ok else "fail", "info": info, **_strip(res)}


def stage_ceilings(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    res = r.sh([PY, "-c", _CEILINGS_PROBE], limit)
    ceil = _grab_json(res["text"], "CEILJSON")
    if ceil:
        r.ceilings.update(ceil)
    return {"status": "ok" if ceil else "fail", "ceilings": ceil, **_strip(res)}


def _arch_list() -> Optional[str]:
    try:
        import torch

        caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(caps) or None
    except Exception:  # noqa: BLE001
        return None


def _build_env(r: "Runner") -> Dict[str, str]:
    env = dict(r.env, FORCE_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", str(min(16, os.cpu_count() or 4))))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or _arch_list()
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch  # only the GPU(s) present: a shorter build
    return env


_BUILD_CMD = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]


def stage_build_start(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """Start the CUDA build in the background (CPU work) while the Triton tests use the GPU."""
    log = open(r.out_dir / "build.log.tmp", "w+", encoding="utf-8", errors="replace")
    r.say(f"$ {' '.join(_BUILD_CMD)}   (background)")
    r.bg_build = (subprocess.Popen(_BUILD_CMD, cwd=REPO, env=_build_env(r), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True), log, time.monotonic())
    return {"status": "started"}


def stage_build_wait(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    if getattr(r, "bg_build", None) is None:  # not started (e.g. --only): build now, in the foreground
        res = r.sh(_BUILD_CMD, limit, env=_build_env(r))
    else:
        proc, log, t0 = r.bg_build
        r.bg_build = None
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        os.unlink(log.name)
        if r.log:
            r.log.write(text + f"\n[build rc={proc.returncode} timed_out={timed_out} {time.monotonic() - t0:.1f} s]\n")
        res = {"cmd": _BUILD_CMD, "rc": proc.returncode, "timed_out": timed_out,
               "seconds": round(time.monotonic() - t0, 1), "tail": text[-4000:], "text": text}
    if res["rc"] != 0:
        return {"status": "fail", **_strip(res)}
    chk = r.sh([PY, "-c", "import torch, distilpose_kernels._C as c; print('extension:', c.__file__)"], 60)
    ok = chk["rc"] == 0
    return {"status": "ok" if ok else "fail", "extension_import": chk["tail"][-500:], **_strip(res)}


def stage_info(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    res = r.sh([PY, "-m", "distilpose_kernels.info"], limit)
    return {"status": "ok" if res["rc"] == 0 else "fail", **_strip(res)}


def _sum_counts(*results: Dict[str, Any]) -> Dict[str, int]:
    """pytest counts of several invocations of one stage, added up."""
    out: Dict[str, int] = {}
    for res in results:
        for k, v in (res.get("counts") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _pytest_stage(r: Runner, args: List[str], limit: float, env=None) -> Dict[str, Any]:
    res = r.sh(PYTEST + args, limit, env=env)
    counts = parse_pytest_summary(res["text"])
    if res["timed_out"]:
        status = "timeout"
    elif res["rc"] == 0:
        status = "ok"
    elif res["rc"] == 5:
        status = "no tests"
    else:
        status = "fail"
    return {"status": status, "counts": counts, **_strip(res)}


def _timeout_args(seconds: int) -> List[str]:
    return [f"--timeout={seconds}"] if _has_plugin("pytest_timeout") else []


def _xdist_args(n: int) -> List[str]:
    return ["-n", str(min(n, os.cpu_count() or 2))] if _has_plugin("xdist") else []


#: test files whose Triton tests run on the GPU when one is present (DEV = "cuda")
TRITON_TEST_FILES = ["tests/test_gpu_kernels.py", "tests/test_attention.py", "tests/test_multiscale.py",
                     "tests/test_mlp.py", "tests/test_keypoints.py"]


def stage_tests_triton(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """The Triton kernels on the device. Heuristic attention blocks (DISTILPOSE_ATTN_AUTOTUNE=0):
    autotuning every shape would spend the stage compiling; one test sweeps every config and one
    the autotuned path. xdist workers compile in parallel. The "slow" tests there are the sm_90
    compile-only checks for machines without a GPU: here the kernels compile and run for real."""
    env = dict(r.env, DISTILPOSE_ATTN_AUTOTUNE="0")
    # --quick: the device-only (gpu-marked) tests of every Triton file, not their CPU-side tests
    marks = "gpu and not slow" if r.quick else "not slow"
    return _pytest_stage(r, [*TRITON_TEST_FILES, "-m", marks, "-q", "-rfEs", *_timeout_args(240), *_xdist_args(8)],
                         limit, env=env)


_CRASH_REPRO = ("import torch, distilpose_kernels.decode; x = torch.randn(2, 4, 4);\n"
                "try:\n    torch.ops.distilpose.soft_argmax_fwd(x, 1.0)\nexcept RuntimeError as e:\n"
                "    print('clear error:', str(e).splitlines()[0])\n")


def _native_backtrace(r: Runner, limit: float) -> Optional[str]:
    """A C++ backtrace of the extension's error path (cuda-gdb debugs host code too)."""
    gdb = shutil.which("cuda-gdb") or ("/usr/local/cuda/bin/cuda-gdb" if os.path.exists("/usr/local/cuda/bin/cuda-gdb") else None)
    if gdb is None:
        return None
    res = r.sh([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", PY, "-c", _CRASH_REPRO], limit)
    return res["text"][-6000:]


def stage_tests_ext(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """GPU tests outside the Triton files, then the whole extension test file (its CPU-side
    error paths through the CUDA build) in one plain process; on a native crash, a backtrace."""
    t0 = time.monotonic()
    ignore = [a for f in TRITON_TEST_FILES for a in ("--ignore", f)]
    # 4 workers: most of these tests' time is Triton / cuDNN compilation, not GPU work
    gpu = _pytest_stage(r, ["tests", "-m", "gpu", *ignore, "-q", "-rfEs", *_timeout_args(120), *_xdist_args(4)],
                        0.6 * limit)
    ext = _pytest_stage(r, ["tests/test_decode.py", "tests/test_extension_build.py::test_extension_uses_the_shared_cxx_runtime",
                            "-m", "not gpu", "-q", "-rfEs", "-p", "no:xdist"],
                        max(10.0, limit - (time.monotonic() - t0) - 20))
    out = {"status": "ok" if gpu["status"] == "ok" and ext["status"] == "ok" else "fail",
           "counts": _sum_counts(gpu, ext),
           "gpu_tests": gpu, "ext_cpu_tests": ext, "seconds": round(time.monotonic() - t0, 1)}
    if ext["rc"] not in (0, 1, 5) or "Segmentation fault" in ext.get("tail", ""):
        out["native_backtrace"] = _native_backtrace(r, 40)
    return out


def stage_tests_rest(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    ignore = [a for f in TRITON_TEST_FILES for a in ("--ignore", f)]
    return _pytest_stage(r, ["tests", "-m", "not gpu", *ignore, "-q", "-rfE", *_xdist_args(8)], limit)


def _find_cuda_tool(name: str) -> Optional[str]:
    """A CUDA toolkit program (compute-sanitizer, ncu): on PATH, else in $CUDA_HOME/bin or
    /usr/local/cuda/bin."""
    cands = [shutil.which(name)]
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base:
            cands.append(os.path.join(base, "bin", name))
    return next((c for c in cands if c and os.path.exists(c)), None)


def _sanitize(r: Runner, cs: str, args: List[str], limit: float, env: Dict[str, str],
              tool: str = "memcheck") -> Dict[str, Any]:
    res = r.sh([cs, "--tool", tool, "--error-exitcode", "86", "--target-processes", "all", *PYTEST, *args,
                "-q", "-rfEs"], limit, env=env)
    counts = parse_pytest_summary(res["text"])
    m = re.search(r"ERROR SUMMARY: (\d+) error", res["text"])
    errors = int(m.group(1)) if m else None
    if res["timed_out"]:
        status = "timeout"
    elif res["rc"] == 0 and counts.get("passed", 0) > 0:
        status = "ok"
    elif res["rc"] == 5 or (res["rc"] == 0 and not counts.get("passed")):
        status = "no tests"
    else:
        status = "fail"
    return {"status": status, "counts": counts, "sanitizer_errors": errors, **_strip(res)}


def stage_sanitizer(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """memcheck on the CUDA extension's GPU tests (caching allocator off, so out-of-bounds
    accesses inside cached blocks are seen) and on the CUDA-graph tests (caching on: a capture
    cannot cudaMalloc); racecheck (shared-memory hazards) on the loss forwards that stream maps
    through shared memory, at a size where each block's ring of stages wraps around."""
    cs = _find_cuda_tool("compute-sanitizer")
    if cs is None:
        return {"status": "skipped", "why": "compute-sanitizer not found"}
    t0 = time.monotonic()
    race = _sanitize(r, cs, ["tests/test_heatmap_ext.py", "-m", "gpu", "-k", "racecheck"], 0.15 * limit, r.env,
                     tool="racecheck")
    ext = _sanitize(r, cs, ["tests/test_decode.py", "tests/test_heatmap_ext.py", "tests/test_targets.py", "-m", "gpu", "-k",
                                "not cuda_graph and not racecheck and "
                                "not (ext_loss_vs_float64 and (256 or 1100 or float16))"],
                    0.5 * limit, dict(r.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    graphs = _sanitize(r, cs, ["tests/test_gpu_kernels.py", "tests/test_heatmap_ext.py", "-m", "gpu", "-k", "cuda_graph"],
                       max(10.0, limit - (time.monotonic() - t0)), r.env)
    parts = (race, ext, graphs)
    return {"status": "ok" if all(p["status"] == "ok" for p in parts) else "fail",
            "counts": _sum_counts(*parts),
            "sanitizer_errors": sum(p["sanitizer_errors"] or 0 for p in parts),
            "racecheck": race, "extension": ext, "cuda_graphs": graphs, "seconds": round(time.monotonic() - t0, 1)}


#: tools/ncu_cases.py cases, in order (the stage keeps what finished)
NCU_CASES = ("loss", "add_norm_b1", "attention_b1", "stem_b64")
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
#: metrics quoted in the stage's summary (names as ncu's CSV gives them)
NCU_METRICS = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
               "Registers Per Thread", "Grid Size", "Block Size")


def parse_ncu_csv(text: str) -> List[Dict[str, Any]]:
    """Kernels of ``ncu --csv --page details`` output: [{"kernel", "metrics": {name: "value unit"}}]
    in launch order, NCU_METRICS only."""
    import csv
    import io

    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    kernels: Dict[str, Dict[str, Any]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row.get("Metric Name")
        if name not in NCU_METRICS:
            continue
        key = row.get("ID", "") + "|" + row.get("Kernel Name", "")
        k = kernels.setdefault(key, {"kernel": row.get("Kernel Name", ""), "metrics": {}})
        k["metrics"][name] = f"{row.get('Metric Value', '')} {row.get('Metric Unit', '')}".strip()
    return list(kernels.values())


def stage_ncu(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """Nsight Compute on one call of each NCU_CASES case (tools/ncu_cases.py), clocks left alone
    (--clock-control none): duration, memory and SM throughput, occupancy and warp stalls of
    the kernels behind the missed goals. The raw CSV goes to the output folder."""
    ncu = _find_cuda_tool("ncu")
    if ncu is None:
        return {"status": "skipped", "why": "ncu not found"}
    t0 = time.monotonic()
    cases: Dict[str, Any] = {}
    for case in NCU_CASES:
        left = limit - (time.monotonic() - t0)
        if left < 15:
            cases[case] = {"status": "not run", "why": "stage time spent"}
            continue
        sections = [a for sec in NCU_SECTIONS for a in ("--section", sec)]
        res = r.sh([ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
                    "--csv", "--page", "details", *sections, PY, "tools/ncu_cases.py", case], left)
        (r.out_dir / f"ncu-{case}-{r.tag}.csv").write_text(res["text"], encoding="utf-8")
        kernels = parse_ncu_csv(res["text"])
        for k in kernels:
            r.say(f"   {case}: {k['kernel'][:60]}: " + ", ".join(f"{n} {v}" for n, v in k["metrics"].items()))
        cases[case] = {"status": "ok" if res["rc"] == 0 and kernels else "fail", "kernels": kernels,
                       **_strip(res)}
    ok = [c for c in cases.values() if c["status"] == "ok"]
    return {"status": "ok" if len(ok) == len(NCU_CASES) else ("partial" if ok else "fail"), "cases": cases,
            "seconds": round(time.monotonic() - t0, 1)}


#: the profile stage's cases (name fragments of tools/profile_ops.py): the goals still missed.
#: Per call, host-bound: the loss and attention fwd+bwd (their host functions are cProfiled).
#: End to end: the kernels of batch-1 fp32 flip and batch-256 bf16 graphs, and the fast-teacher
#: distillation step NCHW with and without the conv epilogues (slower with them on the H100).
PROFILE_CASES = (
    "e2e S b1 fp32 flip cuda_graph",
    "simulated_heatmap_loss fwd+bwd N=256",
    "token_attention fwd+bwd",
    "e2e S b256 bf16 noflip cast_model channels_last",
    "e2e distill step b64 bf16 fastteacher",
)


def stage_profile(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
    """tools/profile_ops.py: per-op wall time vs summed kernel time (torch.profiler), and the
    host functions behind the per-call time (cProfile). The tool rewrites its JSON after each
    row, so a stage cut short keeps what was measured."""
    tmp = Path(tempfile.mkdtemp(prefix="distilpose-profile-")) / "profile.json"
    # the end-to-end rows first: the batch-1 graph's kernels (launches, one call's sequence) are
    # the missed goal's evidence, and the stage is often cut short
    res = r.sh([PY, "tools/profile_ops.py", "--only", ",".join(PROFILE_CASES), "--e2e-first", "--json", str(tmp)],
               limit)
    data = json.loads(tmp.read_text()) if tmp.exists() else {}
    rows = data.get("rows")
    status = "ok" if res["rc"] == 0 and rows else ("partial" if rows else "fail")
    return {"status": status, "rows": rows, "host": data.get("host"), **_strip(res)}


def make_bench_stage(stage_name: str) -> Callable:
    def run(r: Runner, st: Stage, limit: float) -> Dict[str, Any]:
        path, kexpr = BENCH_SELECTIONS[stage_name]
        paths = [path] if isinstance(path, str) else list(path)
        missing = [p for p in paths if not (REPO / p).exists()]
        if missing:
            return {"status": "missing", "why": f"{missing} do not exist"}
        if not r.has_gpu:  # check that the selection still matches GPU cases
            res = r.sh(PYTEST + [*paths, "--collect-only", "-q", "-k", kexpr], limit)
            ids = [ln.strip() for ln in res["text"].splitlines() if "::" in ln]
            r.say("   selected: " + (", ".join(i.split("::")[-1] for i in ids) or "NOTHING"))
            return {"status": "selection ok" if ids else ("selection EMPTY" if res["rc"] in (0, 5) else "fail"),
                    "collected": len(ids), "selected": ids, **_strip(res)}
        out = r.out_dir / f"{stage_name.replace('bench-', '')}-{r.tag}.json"
        res = _pytest_stage(r, [*paths, "--benchmark-only", "-k", kexpr, "-q", "-rfEs", "--benchmark-json", str(out),
                                "--benchmark-columns=median,iqr,rounds,iterations", "--benchmark-sort=name"], limit)
        if out.exists():
            r.bench_files[stage_name] = str(out)
            res["json"] = str(out)
        return res

    return run


def _has_plugin(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _strip(res: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in res.items() if k != "text"}


STAGES: List[Stage] = [
    Stage("env", "versions, GPU name (nvidia-smi query only)", 30, 5, needs_gpu=False, run=stage_env),
    Stage("build-start", "FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e . (background)", 10, 1,
          run=stage_build_start),
    Stage("ceilings", "measured ceilings: D2D copy GB/s, bf16/fp32/tf32 matmul TFLOP/s", 45, 10, run=stage_ceilings),
    Stage("tests-triton", "pytest " + " ".join(TRITON_TEST_FILES) + " (Triton kernels on the GPU)", 150, 30,
          run=stage_tests_triton),
    Stage("bench-graphs", "attention B=64 bf16 captured in CUDA graphs (device time)", 60, 20,
          run=make_bench_stage("bench-graphs")),
    Stage("build", "wait for the CUDA build; import distilpose_kernels._C", 180, 30, run=stage_build_wait),
    Stage("info", "python -m distilpose_kernels.info (what each op dispatches to)", 30, 5, run=stage_info),
    Stage("bench-attention", "token attention B=64 bf16 fwd / fwd+bwd: fused vs einsum vs SDPA", 75, 20,
          run=make_bench_stage("bench-attention")),
    # the end-to-end goals right after the build: the batch-1 goal is the one still missed, and a
    # short lease must not lose it to the stages after (run 7 cut it at 86 s)
    Stage("bench-e2e", "S batch-1 fp32 flip/no flip (and channels-last); S batch-256 bf16 (reference and the graph paths)", 150, 45,
          run=make_bench_stage("bench-e2e")),
    Stage("tests-ext", "pytest tests -m gpu (CUDA extension, export, the rest of the GPU tests)", 120, 20,
          run=stage_tests_ext),
    Stage("bench-heatmap", "Reg2HM+score loss N=256 fwd+bwd per call and in CUDA graphs (default path = "
          "extension, and Triton); targets N=64", 90, 20, run=make_bench_stage("bench-heatmap")),
    Stage("bench-decode", "soft-argmax N=256 GB/s", 45, 15, run=make_bench_stage("bench-decode")),
    Stage("sanitizer", "compute-sanitizer memcheck: the CUDA extension's GPU tests and the CUDA-graph tests", 90, 20,
          run=stage_sanitizer),
    Stage("bench-e2e-train", "distillation step b64 bf16: reference, fused, frozen-teacher variants", 120, 30,
          run=make_bench_stage("bench-e2e-train")),
    Stage("bench-qkv", "qkv projection + attention at batch 1 (2 x 273 tokens) in CUDA graphs: one kernel vs "
          "linear + attention, fp32 and bf16", 60, 15, run=make_bench_stage("bench-qkv")),
    Stage("bench-b1-graphs", "batch-1 building blocks in CUDA graphs: add-norm / MLP / attention (546 rows), "
          "Bottleneck convs (batch 2)", 75, 15, run=make_bench_stage("bench-b1-graphs")),
    Stage("profile", "tools/profile_ops.py on the missed goals' cases (PROFILE_CASES): wall vs kernel time, "
          "host functions, kernels of the e2e graphs", 100, 30, run=stage_profile),
    Stage("ncu", "Nsight Compute counters of one call of the missed goals' kernels (tools/ncu_cases.py)", 90, 15,
          run=stage_ncu),
    Stage("bench-e2e-variants", "S batch-1 fp32 diagnostic paths (nofold, tf32, ieee, nomlpk, noqkv, nopdl, noepi, plain); batch-256 ones", 90, 15,
          run=make_bench_stage("bench-e2e-variants")),
    Stage("bench-conv", "fused conv epilogue vs unfused (Bottleneck shapes); HRNet fusion sum vs eager / compile", 60, 10,
          run=make_bench_stage("bench-conv")),
    Stage("bench-fusions", "TDE GEMM fusions: fc1+GELU, fp32 Linear (3xTF32), one-kernel MLP, GEMM + add + LayerNorm",
          75, 10, run=make_bench_stage("bench-fusions")),
    Stage("bench-e2e-compile", "S batch-1 flip fp32 with torch.compile (+ CUDA graph)", 120, 20,
          run=make_bench_stage("bench-e2e-compile")),
    Stage("tests-rest", "the rest of the suite on the GPU machine (pytest tests -m 'not gpu')", 150, 20,
          run=stage_tests_rest),
]


# ----------------------------------------------------------------------------- goals


def _load_benchmarks(files: List[str]) -> List[dict]:
    out = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        for b in data.get("benchmarks", []):
            b = dict(b)
            # which suite: the benchmark's own source file (one stage may run several files)
            b["_file"] = os.path.basename(f) + " " + (b.get("fullname") or "")
            out.append(b)
    return out


def _info(b: dict, *keys: str):
    ei = b.get("extra_info", {})
    for k in keys:
        if k in ei:
            return ei[k]
    return None


#: ``auto_choices``' name of the graph-level PDL decision (distilpose_kernels._utils.PDL_DECISION)
PDL_DECISION = "capture_cuda_graph: programmatic dependent launch"


def _pdl_note(b: dict) -> str:
    """", PDL <kept|not kept> (<why>, graph <on> vs <off> ms)" from a case's recorded decisions."""
    for d in _info(b, "auto_choices") or []:
        if d.get("op") == PDL_DECISION:
            times = (f", graph {d['fused_ms']:.3f} vs {d['reference_ms']:.3f} ms"
                     if d.get("fused_ms") is not None and d.get("reference_ms") is not None else "")
            return f", PDL {'kept' if d.get('use') == 'fused' else 'not kept'} ({d.get('why')}{times})"
    return ""


def _median(b: dict) -> Optional[float]:
    m = _info(b, "median_s")
    if m is None:
        m = (b.get("stats") or {}).get("median")
    return float(m) if m else None


def _eq(v, want) -> bool:
    if isinstance(want, (list, tuple, set)):
        return any(_eq(v, w) for w in want)
    if v is None:
        return False
    return str(v).lower() == str(want).lower()


def select(benchmarks: List[dict], name_has: tuple = (), **fields) -> List[dict]:
    """Cases whose extra_info fields match (a field given as tuple of keys: any of them;
    a value given as list: any of them) and whose name contains every ``name_has``."""
    out = []
    for b in benchmarks:
        name = (b.get("fullname") or b.get("name") or "").lower()
        if any(s.lower() not in name for s in name_has):
            continue
        ok = True
        for key, want in fields.items():
            keys = key.split("__or__")
            if callable(want):
                ok = want(_info(b, *keys))
            else:
                ok = _eq(_info(b, *keys), want)
            if not ok:
                break
        if ok and _median(b):
            out.append(b)
    return out


def _fastest(cases: List[dict]) -> Optional[dict]:
    return min(cases, key=_median) if cases else None


def _fmt_t(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-4:  # kernels of a few microseconds (batch-1 GEMMs in a graph)
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def evaluate_goals(benchmarks: List[dict], ceilings: Dict[str, float]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    bw = ceilings.get("copy_gbps")

    def row(goal, target, measured, ok, detail="", floor=""):
        status = "NOT RUN" if ok is None else ("info" if ok == "info" else ("PASS" if ok else "MISS"))
        rows.append({"goal": goal, "target": target, "measured": measured, "status": status, "detail": detail,
                     "floor": floor})

    def floor_of(b: Optional[dict], peak_key: str) -> str:
        if not b:
            return ""
        fl, by = _info(b, "flops"), _info(b, "bytes")
        parts = []
        tf = (fl / (ceilings[peak_key] * 1e12)) if fl and ceilings.get(peak_key) else None
        tb = (by / (bw * 1e9)) if by and bw else None
        if tf:
            parts.append(f"FLOPs/{peak_key.split('_')[0]} peak {_fmt_t(tf)}")
        if tb:
            parts.append(f"bytes/copy BW {_fmt_t(tb)}")
        m = _median(b)
        if (tf or tb) and m:
            fl_t = max(tf or 0, tb or 0)
            parts.append(f"measured {m / fl_t:.1f}x the floor ({'compute' if (tf or 0) >= (tb or 0) else 'memory'} side)")
        return ", ".join(parts)

    # --- attention: per call (Python + launches included) and captured in CUDA graphs (device time)
    att = [b for b in benchmarks if "test_token_attention_gpu" in b["_file"] and _eq(_info(b, "batch"), 64)
           and _eq(_info(b, "dtype"), "bf16")]
    for graphed in (False, True):
        sfx = "_cudagraph" if graphed else ""
        how = "CUDA graph" if graphed else "per call"
        for mode, base_label, base_sel, target in (
            ("fwdbwd", "best SDPA", lambda v, s=sfx: str(v).startswith("sdpa") and str(v).endswith(s) and (s or "cudagraph" not in str(v)), 1.5),
            ("fwd", "eager einsum", lambda v, s=sfx: _eq(v, "eager" + s), 4.0),
        ):
            fused = _fastest(select(att, impl="fused" + sfx, mode=mode))
            base = _fastest(select(att, impl=base_sel, mode=mode))
            goal = f"attention B=64 bf16 {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'} vs {base_label} ({how})"
            if fused and base:
                sp = _median(base) / _median(fused)
                row(goal, f">= {target}x", f"{sp:.2f}x ({_fmt_t(_median(fused))} vs {_info(base, 'impl')} {_fmt_t(_median(base))})",
                    sp >= target, floor=floor_of(fused, "bf16_tflops"))
            else:
                row(goal, f">= {target}x", "-", None)

    # --- heatmap loss
    hl = [b for b in benchmarks if "test_loss_fwd_bwd_gpu" in b["_file"] and _eq(_info(b, "n", "batch"), 256)
          and _eq(_info(b, "teacher_dtype", "dtype"), "fp32")]
    for graphed in (False, True):
        sfx = "_cudagraph" if graphed else ""
        how = "CUDA graph" if graphed else "per call"
        fused = _fastest(select(hl, impl="fused" + sfx))
        for base_impl, target in (("eager", 8.0), ("compile", 2.0)):
            if graphed and base_impl == "eager":
                continue  # no eager-graph case: the compiled graph is the stronger baseline
            base = _fastest(select(hl, impl=base_impl + sfx))
            goal = f"sim. heatmap loss N=256 fwd+bwd vs {base_impl} ({how})"
            if fused and base:
                sp = _median(base) / _median(fused)
                row(goal, f">= {target}x", f"{sp:.2f}x ({_fmt_t(_median(fused))} vs {_fmt_t(_median(base))})", sp >= target)
            else:
                row(goal, f">= {target}x", "-", None)
    # the default path only (its forward kernel chosen by "auto"): the op's own forward + backward
    # in a CUDA graph with the upstream gradients given ("fused_opgrad_cudagraph"; results from
    # before it existed: the caller's form); the caller's form (gradient of reg2hm + 0.01 * score:
    # three more PyTorch kernels in the graph) and the forced forward kernels reported beside it
    caller = max(select(hl, impl=["fused", "fused_cudagraph"]), key=lambda b: _info(b, "gbps") or 0, default=None)
    # the op's graph with or without programmatic dependent launch ("fused_pdl_opgrad_cudagraph"),
    # whichever is faster: both are the library's default path, captured two ways
    best = _fastest(select(hl, impl=["fused_opgrad_cudagraph", "fused_pdl_opgrad_cudagraph"])) or caller
    g = _info(best, "gbps") if best else None
    if g and bw:
        forced = []
        for kernel in ("blocks", "persistent", "pipelined"):
            fb = _fastest(select(hl, impl=f"fused_{kernel}_cudagraph"))
            gk = _info(fb, "gbps") if fb else None
            if gk:
                forced.append(f"{kernel} {gk / bw:.0%} ({_fmt_t(_median(fb))})")
        chosen = _info(best, "fwd_kernel")
        gc = _info(caller, "gbps") if caller is not None and caller is not best else None
        row("sim. heatmap loss N=256 bandwidth", ">= 60% of HBM",
            f"{g:.0f} GB/s = {g / bw:.0%} of {bw:.0f} GB/s copy ({_info(best, 'impl')}, {_fmt_t(_median(best))}"
            + (f", forward: {chosen}" if chosen else "") + ")"
            + (f"; with the caller's reg2hm + 0.01 * score: {gc / bw:.0%} ({_fmt_t(_median(caller))})" if gc else "")
            + (f"; forced forwards: {', '.join(forced)}" if forced else ""),
            g / bw >= 0.6)
    else:
        row("sim. heatmap loss N=256 bandwidth", ">= 60% of HBM", "-", None)
    tg = [b for b in benchmarks if "heatmap" in b["_file"] and _eq(_info(b, "op"), "gaussian_heatmap_targets")
          and _eq(_info(b, "encoding"), "unbiased")]
    # the default GPU path: the extension's kernel where built ("cuda"), else the Triton kernel
    t_gpu = _fastest(select(tg, impl="cuda")) or _fastest(select(tg, impl="triton"))
    t_np = _fastest(select(tg, impl="numpy_loop"))
    if t_gpu and t_np:
        sp = _median(t_np) / _median(t_gpu)
        others = ", ".join(f"{_info(b, 'impl')} {_median(t_np) / _median(b):.0f}x"
                           for b in (_fastest(select(tg, impl=i)) for i in ("cuda", "triton")) if b and b is not t_gpu)
        row("heatmap targets N=64 GPU vs numpy loop", ">= 500x",
            f"{sp:.0f}x via {_info(t_gpu, 'impl')} ({_median(t_gpu) * 1e6:.1f} us vs {_median(t_np) * 1e3:.1f} ms)"
            + (f" (others: {others})" if others else ""), sp >= 500)
    else:
        row("heatmap targets N=64 GPU vs numpy loop", ">= 500x", "-", None)

    # --- soft-argmax
    def is_soft_fwd(b: dict) -> bool:
        op = _info(b, "op")
        if op is not None:
            return _eq(op, ["soft_argmax_fwd", "soft_argmax", "soft_argmax_forward"])
        name = b.get("name", "").lower()
        return "soft_argmax" in name and "backward" not in name and "bwd" not in name

    sa = [b for b in benchmarks if "decode" in b["_file"] and _eq(_info(b, "n", "batch", "N"), 256) and is_soft_fwd(b)
          and not str(_info(b, "device") or "").startswith("CPU")]
    ext = [b for b in sa if not _eq(_info(b, "impl"), ["reference", "eager", "torch", "compile", "pytorch"])]
    for graphed, how in ((False, "per call"), (True, "CUDA graph")):
        cases = [b for b in ext if ("cudagraph" in str(_info(b, "impl"))) == graphed]
        best = max(cases, key=lambda b: _info(b, "gbps") or 0, default=None)
        g = _info(best, "gbps") if best else None
        goal = f"soft-argmax N=256 fwd bandwidth ({how})"
        if g and bw:
            row(goal, ">= 70% of HBM", f"{g:.0f} GB/s = {g / bw:.0%} ({_info(best, 'impl')}, {_fmt_t(_median(best))})",
                g / bw >= 0.7)
        else:
            row(goal, ">= 70% of HBM", "-", None)

    # --- end to end
    e2e = [b for b in benchmarks if "e2e" in b["_file"] and _eq(_info(b, "preset"), "distilpose_s")]
    for flip, target in ((True, 1000.0), (False, None)):
        cases = select(e2e, batch=1, precision="fp32", flip_test=lambda v, f=flip: v is f)
        # TF32 matmul cases are listed with the others but do not count for an fp32 goal
        best = _fastest([b for b in cases if not _eq(_info(b, "path"), "reference")
                         and "tf32" not in str(_info(b, "path"))])
        goal = f"DistilPose-S b1 fp32 {'flip test' if flip else 'no flip'} FPS"
        tgt = f">= {target:.0f} ({target / PAPER_FPS_S:.0f}x paper {PAPER_FPS_S})" if target else "(report)"
        if best:
            fps = 1.0 / _median(best)
            others = ", ".join(f"{_info(b, 'path')} {1.0 / _median(b):.0f}" for b in sorted(cases, key=_median) if b is not best)
            detail = (f"{fps:.0f} FPS via {_info(best, 'path')}" + _pdl_note(best)
                      + (f" (others: {others})" if others else ""))
            row(goal, tgt, detail, (fps >= target) if target else "info", floor=floor_of(best, "fp32_tflops"))
        else:
            row(goal, tgt, "-", None)
    cases = select(e2e, batch=256, precision="bf16", flip_test=lambda v: v is False)
    best = _fastest([b for b in cases if not _eq(_info(b, "path"), "reference")])
    if best:
        ips = 256 / _median(best)
        others = ", ".join(f"{_info(b, 'path')} {256 / _median(b):.0f}" for b in sorted(cases, key=_median) if b is not best)
        row("DistilPose-S b256 bf16 images/s (no flip)", ">= 20000",
            f"{ips:.0f} img/s via {_info(best, 'path')}" + (f" (others: {others})" if others else ""),
            ips >= 20000, floor=floor_of(best, "bf16_tflops"))
    else:
        row("DistilPose-S b256 bf16 images/s (no flip)", ">= 20000", "-", None)
    tr = [b for b in benchmarks if "e2e" in b["_file"] and _info(b, "teacher") and _eq(_info(b, "batch"), 64)]
    fused = _fastest([b for b in tr if not _eq(_info(b, "path"), "reference")])
    ref = _fastest(select(tr, path="reference"))
    if fused and ref:
        sp = _median(ref) / _median(fused)
        mem = _info(fused, "peak_mem_mb"), _info(ref, "peak_mem_mb")
        others = ", ".join(f"{_info(b, 'path')} {64 / _median(b):.0f}" for b in sorted(tr, key=_median)
                           if b is not fused and b is not ref)
        row("distillation step b64 bf16 vs reference", ">= 1.5x",
            f"{sp:.2f}x via {_info(fused, 'path')} ({64 / _median(fused):.0f} vs {64 / _median(ref):.0f} img/s; peak "
            f"{(mem[0] or 0) / 1024:.1f} vs {(mem[1] or 0) / 1024:.1f} GiB)" + (f" (others: {others})" if others else ""),
            sp >= 1.5, floor=floor_of(fused, "bf16_tflops"))
    else:
        row("distillation step b64 bf16 vs reference", ">= 1.5x", "-", None)
    # --- fused conv epilogue (info: the building block behind the backbone paths above)
    def vs_baseline(goal: str, cases: List[dict], base_impl: str, impls: tuple) -> None:
        """An info row: each impl's speed-up over ``base_impl`` (time, GB/s where bytes are known)."""
        base = _fastest(select(cases, impl=base_impl))
        if not base:
            return
        parts = []
        for impl in impls:
            b = _fastest(select(cases, impl=impl))
            if b:
                gbps = f", {(_info(b, 'bytes') or 0) / _median(b) / 1e9:.0f} GB/s" if _info(b, "bytes") else ""
                parts.append(f"{impl} {_median(base) / _median(b):.2f}x ({_fmt_t(_median(b))}{gbps})")
        row(goal, "(report)", f"{base_impl} {_fmt_t(_median(base))}; " + "; ".join(parts), "info")

    conv = [b for b in benchmarks if "test_conv2d_relu_gpu" in b["_file"]]
    for case in ("b1x1res", "b3x3"):
        for setting in ("b256_bf16_cl", "b2_fp32"):
            vs_baseline(f"conv epilogue {case} {setting} vs unfused", select(conv, case=case, setting=setting),
                        "unfused", ("cudnn", "triton", "auto", "compile"))
        vs_baseline(f"conv epilogue {case} b2_fp32 in a CUDA graph vs unfused",
                    select(conv, case=case, setting="b2_fp32"), "unfused_graph", ("cudnn_graph", "triton_graph"))
    stem = [b for b in benchmarks if "test_stem_conv_gpu" in b["_file"]]
    for setting in ("b256_bf16_cl", "b64_bf16_cl"):
        vs_baseline(f"stem conv 3->64 s2 {setting} vs unfused", select(stem, setting=setting), "unfused",
                    ("cudnn", "triton", "auto"))
    ups = [b for b in benchmarks if "test_upsample_sum_gpu" in b["_file"]]
    for layout in ("cl", "nchw"):
        vs_baseline(f"HRNet fusion sum b64 bf16 {layout} vs eager", select(ups, layout=layout), "eager",
                    ("fused", "compile"))
    lg = [b for b in benchmarks if "test_linear_gelu_gpu" in b["_file"]]
    for n, dtype in ((256, "bfloat16"), (2, "float32")):
        vs_baseline(f"TDE fc1+GELU B={n} {dtype} vs cuBLAS+GELU", select(lg, batch=n), "eager",
                    ("fused", "auto", "compile"))
    fm = [b for b in benchmarks if "test_fused_mlp_gpu" in b["_file"]]
    for n, dtype in ((256, "bfloat16"), (2, "float32")):
        vs_baseline(f"TDE MLP B={n} {dtype} one kernel vs cuBLAS+GELU+cuBLAS", select(fm, batch=n), "eager",
                    ("fused", "auto", "linear_gelu", "compile"))
    an = [b for b in benchmarks if "test_add_norm_gpu" in b["_file"]]
    for op in ("proj", "mlp"):
        for n, dtype in ((256, "bfloat16"), (2, "float32")):
            vs_baseline(f"TDE {op} + add + LayerNorm B={n} {dtype} one kernel vs eager",
                        select(an, op=f"{op}_add_norm", batch=n), "eager", ("fused", "auto", "split", "gemms"))
    ab = [b for b in benchmarks if "test_attention_fp32_b1_graph_gpu" in b["_file"]]
    vs_baseline("TDE attention B=2 fp32 graph vs einsum", ab, "eager", ("plain", "tuned"))
    qa = [b for b in benchmarks if "test_qkv_attention_b1_graph_gpu" in b["_file"]]
    for dtype in ("fp32", "bf16"):
        vs_baseline(f"TDE qkv + attention B=2 {dtype} graph: one kernel vs linear + attention",
                    select(qa, dtype=dtype), "two_ops", ("fused", "auto"))
    a1 = [b for b in benchmarks if "test_add_norm_fp32_b1_graph_gpu" in b["_file"]]
    for case in ("proj", "fc2", "mlp"):
        vs_baseline(f"TDE {case} + add + LayerNorm B=2 fp32 graph vs eager", select(a1, op=f"{case}_add_norm_b1"),
                    "eager", ("rows", "tuned", "auto", "gemms"))
    lf = [b for b in benchmarks if "test_linear_fp32_gpu" in b["_file"]]
    for shape in ("192x576", "192x192", "576x192"):
        vs_baseline(f"TDE Linear {shape} B=2 fp32 graph vs cuBLAS", select(lf, shape=shape), "cublas",
                    ("triton_ieee", "triton_tf32x3", "auto"))
    return rows


def print_table(rows: List[Dict[str, Any]], stages: List[Stage], device: str) -> str:
    lines = [f"GPU check on {device}: stages"]
    for st in stages:
        res = st.result
        c = res.get("counts") or {}
        cs = " ".join(f"{k}={v}" for k, v in c.items())
        lines.append(f"  {st.name:<18} {res.get('status', 'not run'):<14} {res.get('seconds', 0):>6.1f} s  {cs}")
    w = max([len(r["goal"]) for r in rows] + [4])
    lines.append("")
    lines.append(f"{'goal':<{w}}  {'target':<24} {'status':<7} measured")
    lines.append("-" * (w + 60))
    for r in rows:
        lines.append(f"{r['goal']:<{w}}  {r['target']:<24} {r['status']:<7} {r['measured']}")
        if r.get("floor"):
            lines.append(f"{'':<{w}}  {'':<24} {'':<7} floor: {r['floor']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def write_summary(r: "Runner", stages: List[Stage], budget: float, has_gpu: bool, partial: bool):
    """Write ``gpu_check-<device>.json`` (atomically): stages so far, ceilings, goal table."""
    benchmarks = _load_benchmarks(list(r.bench_files.values()))
    rows = evaluate_goals(benchmarks, r.ceilings)
    summary = {
        "device": r.device,
        "has_gpu": has_gpu,
        "partial": partial,
        "elapsed_s": round(r.elapsed(), 1),
        "budget_s": budget,
        "ceilings": r.ceilings,
        "env": next((s.result.get("info") for s in stages if s.name == "env"), None),
        "stages": {s.name: s.result for s in stages},
        "bench_files": {k: os.path.basename(v) for k, v in r.bench_files.items()},
        "goals": rows,
        "selections": {k: {"file": v[0], "k": v[1]} for k, v in BENCH_SELECTIONS.items()},
    }
    summary_path = r.out_dir / f"gpu_check-{r.tag}.json"
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, summary_path)
    return rows, summary_path


def write_bundle(out_dir: Path, bundle: Path) -> None:
    """One .tgz of every output file so far (written to a temp name, then renamed)."""
    import tarfile

    bundle.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle.with_name(bundle.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(out_dir.iterdir()):
            # build.log.tmp is the CUDA build's log (kept under that name while the build runs)
            if f.is_file() and f != bundle and (not f.name.endswith(".tmp") or f.name == "build.log.tmp"):
                tar.add(f, arcname=f.name)
    os.replace(tmp, bundle)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the stages and their limits; run nothing")
    ap.add_argument("--list-goals", action="store_true", help="print the benchmark selections and exit")
    ap.add_argument("--budget", type=float, default=520.0, help="total seconds for all stages (default 520)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/results)")
    ap.add_argument("--only", default=None, help="comma-separated stage names to run")
    ap.add_argument("--skip", default="", help="comma-separated stage names to skip (e.g. build)")
    ap.add_argument("--bundle", default=None, metavar="PATH.tgz",
                    help="after every stage, (re)write one .tgz of all outputs so far (atomically): for a "
                         "device tool that returns only a few files, and survives a kill mid-run")
    ap.add_argument("--quick", action="store_true",
                    help="tests-triton runs only the gpu-marked tests of the Triton test files")
    ap.add_argument("--combine", default=None, metavar="OUT.json",
                    help="with --from-json: also write one combined summary (goal table) of those files")
    ap.add_argument("--from-json", nargs="*", default=None,
                    help="recompute the goal table from existing benchmark JSON files (no runs)")
    args = ap.parse_args(argv)

    if args.list_goals:
        for name, (path, k) in BENCH_SELECTIONS.items():
            print(f"{name:<18} {path}\n{'':<18} -k {k!r}")
        return 0
    if args.from_json is not None:
        ceil: Dict[str, float] = {}
        files, summaries = [], []
        for f in args.from_json:
            try:
                d = json.loads(Path(f).read_text())
            except (OSError, ValueError):
                print(f"gpu_check: skipping unreadable {f}", file=sys.stderr)
                continue
            if "ceilings" in d and "stages" in d:
                ceil.update(d.get("ceilings") or {})
                summaries.append((f, d))
            else:
                files.append(f)
        rows = evaluate_goals(_load_benchmarks(files), ceil)
        device = next((d.get("device") for _, d in summaries if d.get("device")), "(from JSON)")
        print(print_table(rows, [], device))
        if args.combine:
            # one goal table from several (partial) runs: the later file of a case wins
            env = next((d.get("env") for _, d in reversed(summaries) if d.get("env")), None)
            combined = {
                "device": device, "has_gpu": any(d.get("has_gpu") for _, d in summaries), "ceilings": ceil,
                "env": env, "goals": rows, "combined_from": [os.path.basename(f) for f in files],
                "stages": {os.path.basename(f): {k: {kk: vv for kk, vv in v.items() if kk in ("status", "counts", "seconds")}
                                                 for k, v in d.get("stages", {}).items()} for f, d in summaries},
            }
            out = Path(args.combine)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(combined, indent=1, default=str))
            os.replace(tmp, out)
            print(f"combined goal table written to {out}")
        return 0

    has_gpu = cuda_available()
    if args.out or os.environ.get("OUT"):
        out_dir = Path(args.out or os.environ["OUT"])
    elif has_gpu:
        out_dir = REPO / "bench" / "results"
    else:  # nothing is measured without a GPU: keep bench/results clean
        out_dir = Path(tempfile.mkdtemp(prefix="distilpose-gpu-check-"))
    stages = list(STAGES)
    if args.only:
        keep = set(args.only.split(","))
        stages = [s for s in stages if s.name in keep]
    skip = set(filter(None, args.skip.split(",")))
    stages = [s for s in stages if s.name not in skip]

    if args.dry_run:
        print(f"GPU check stages (budget {args.budget:.0f} s; CUDA GPU here: {'yes' if has_gpu else 'no'}):")
        for s in stages:
            sel = BENCH_SELECTIONS.get(s.name)
            print(f"  {s.name:<18} max {s.max_s:>4.0f} s (reserved {s.min_s:>3.0f} s)  {s.what}")
            if sel:
                print(f"  {'':<18} {sel[0]} -k {sel[1]!r}")
        print(f"outputs: {out_dir}/gpu_check-<device>.json, .log, and <stage>-<device>.json per benchmark stage")
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    r = Runner(out_dir, args.budget, dry_run=False, has_gpu=has_gpu)
    r.quick = args.quick
    r.say(f"distilpose GPU check: {r.device}; budget {args.budget:.0f} s; output {out_dir}")
    if not has_gpu:
        r.say("NO CUDA GPU on this machine: building with CUDA, GPU tests, compute-sanitizer and the GPU "
              "benchmarks are skipped; checking that every benchmark selection still matches cases.")

    for i, st in enumerate(stages):
        later = [s for s in stages[i + 1:] if has_gpu or not s.needs_gpu or s.name.startswith("bench")]
        reserve = sum(s.min_s for s in later)
        left = args.budget - r.elapsed()
        limit = min(st.max_s, left - reserve)
        if st.needs_gpu and not has_gpu and not st.name.startswith("bench"):
            st.result = {"status": "skipped", "why": "no CUDA GPU"}
            r.say(f"== {st.name}: skipped (no CUDA GPU)")
            continue
        if limit < min(st.min_s, 10):
            st.result = {"status": "no time", "why": f"{left:.0f} s left, {reserve:.0f} s reserved for later stages"}
            r.say(f"== {st.name}: skipped, no time left")
            continue
        r.say(f"== {st.name}: {st.what} (limit {limit:.0f} s, {r.elapsed():.0f} s elapsed)")
        try:
            st.result = st.run(r, st, limit)
        except Exception as e:  # noqa: BLE001 - one stage never stops the rest
            st.result = {"status": "error", "why": f"{type(e).__name__}: {e}"}
        r.say(f"   -> {st.result.get('status')} ({st.result.get('seconds', 0)} s)")
        if args.bundle:
            write_summary(r, stages, args.budget, has_gpu, partial=True)
            write_bundle(out_dir, Path(args.bundle))

    rows, summary_path = write_summary(r, stages, args.budget, has_gpu, partial=False)
    table = print_table(rows, stages, r.device)
    if r.log:
        r.log.write("\n" + table + "\n")
        r.log.close()
    print(f"\nfull results: {summary_path} (+ {r.log_path.name}"
          + "".join(f", {os.path.basename(v)}" for v in r.bench_files.values()) + f"); {r.elapsed():.0f} s in all")
    if not has_gpu:
        print("NO CUDA GPU: nothing was measured; the goal table below is empty by construction.")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
