"""Where the time of each fused op goes on a GPU: device (kernel) time vs per-call wall time.

    python tools/profile_ops.py [--json out.json]

For each op at the benchmark's size it reports the wall time of one call (synchronised, median
of 20), the summed duration of the CUDA kernels one call launches (torch.profiler), the
kernels themselves, and the device-time bandwidth where the op's minimum bytes are known.
A wall time far above the kernel time means the op is bound by Python / launch overhead at
that size (a CUDA graph or torch.compile removes most of it); the reverse means the kernels
themselves are slow. Then (unless ``--no-host``) cProfile of the per-call ops: the host
functions that take that wall time (ours, Triton's launcher, autograd, torch). The JSON is
rewritten after every row, so a run cut short keeps what it measured.
Needs a CUDA device; prints nothing useful without one.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import distilpose_kernels as dk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from distilpose.fileio import atomic_write  # noqa: E402


def _wall(fn: Callable[[], object], n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _kernels(fn: Callable[[], object], n: int = 10) -> Tuple[Dict[str, float], Dict[str, float], List[list]]:
    """For ONE call (averaged over ``n`` calls): summed device time per kernel name (seconds),
    launches per kernel name, and the first call's kernels in launch order ([name, us]): the
    order tells which layer a kernel belongs to (e.g. which convolution)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out: Dict[str, float] = {}
    counts: Dict[str, float] = {}
    evs = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            dur_us = ev.time_range.elapsed_us()
            out[ev.name] = out.get(ev.name, 0.0) + dur_us * 1e-6 / n
            counts[ev.name] = counts.get(ev.name, 0.0) + 1.0 / n
            evs.append((ev.time_range.start, ev.name, dur_us))
    evs.sort(key=lambda e: e[0])
    per_call = len(evs) // n if n else 0
    sequence = [[name[:100], round(us, 2)] for _, name, us in evs[:per_call]]
    return out, counts, sequence


def host_profile(fn: Callable[[], object], calls: int = 200, top: int = 14) -> List[dict]:
    """cProfile ``calls`` back-to-back calls (one sync at the end): the functions with the most
    own time, in us per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.basename(file)}:{line}({func})", "calls_per_call": nc / calls,
                     "own_us": tt / calls * 1e6, "cum_us": ct / calls * 1e6})
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def _with_env(var: str, value: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the environment variable ``var`` set (restored afterwards)."""

    def run():
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old

    return run


def cases(dev: torch.device, want: Callable[[str], bool] = lambda name: True) -> List[tuple]:
    """(name, fn, bytes) of every case; the end-to-end models are built only for wanted names."""
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    # token attention, the TDE's shape, B=64 bf16
    qkv = torch.randn(64, 273, 576, generator=g).to(dev, torch.bfloat16).requires_grad_()
    dout = torch.randn(64, 273, 192, generator=g).to(dev, torch.bfloat16)
    out.append(("token_attention fwd B=64 bf16", lambda: dk.token_attention(qkv, 8), 64 * 273 * (576 + 192) * 2))
    out.append(("token_attention fwd+bwd B=64 bf16",
                lambda: torch.autograd.grad(dk.token_attention(qkv, 8), qkv, dout), 64 * 273 * (576 + 192) * 2 * 2
                + 64 * 273 * (192 + 576) * 2))
    # simulated heatmap loss, N=256, fp32 teacher
    n, k, h, w = 256, 17, 64, 48
    c = torch.rand(n, k, 2, generator=g).to(dev).requires_grad_()
    s = (torch.rand(n, k, 2, generator=g) * 3 + 0.5).to(dev).requires_grad_()
    sc = torch.rand(n, k, 1, generator=g).to(dev).requires_grad_()
    t = torch.rand(n, k, h, w, generator=g).to(dev)
    wt = torch.ones(n, k, 1, device=dev)

    def loss(backend=None):  # None: the default path (the CUDA extension when built, else Triton)
        reg, sl = dk.simulated_heatmap_loss(c, s, sc, t, wt, backend=backend)
        return torch.autograd.grad(reg + 0.01 * sl, (c, s, sc))

    loss_bytes = t.numel() * 4 + n * k * 11 * 4
    out.append(("simulated_heatmap_loss fwd+bwd N=256", loss, loss_bytes))
    out.append(("simulated_heatmap_loss fwd+bwd N=256 triton", lambda: loss("triton"), loss_bytes))

    def loss_default_tile():  # what the Triton tile tuner buys: the same call on the heuristic tile
        from distilpose_kernels import heatmap_triton as hmt

        old, hmt.TILE_OVERRIDE = hmt.TILE_OVERRIDE, hmt.default_loss_tile(h, w)
        try:
            return loss("triton")
        finally:
            hmt.TILE_OVERRIDE = old

    out.append(("simulated_heatmap_loss fwd+bwd N=256 triton default tile", loss_default_tile, loss_bytes))

    def loss_forced(kernel: str):  # the extension with one forward kernel forced (the default times them)
        def run():
            old = os.environ.get("DISTILPOSE_SIMHM_FWD")
            os.environ["DISTILPOSE_SIMHM_FWD"] = kernel
            try:
                return loss()
            finally:
                if old is None:
                    del os.environ["DISTILPOSE_SIMHM_FWD"]
                else:
                    os.environ["DISTILPOSE_SIMHM_FWD"] = old
        return run

    for kernel in ("blocks", "persistent", "pipelined"):
        out.append((f"simulated_heatmap_loss fwd+bwd N=256 {kernel}", loss_forced(kernel), loss_bytes))
    # soft-argmax forward N=256, DARK decode N=256
    x = (torch.randn(n, k, h, w, generator=g) * 3).to(dev)
    out.append(("soft_argmax fwd N=256", lambda: dk.soft_argmax(x), x.numel() * 4 + n * k * 3 * 4))
    out.append(("soft_argmax fwd N=256 scalar kernel", _with_env("DISTILPOSE_SOFTARGMAX_VEC", "0", lambda: dk.soft_argmax(x)),
                x.numel() * 4 + n * k * 3 * 4))
    out.append(("decode_heatmaps dark N=256", lambda: dk.decode_heatmaps(x, "dark"), x.numel() * 4 + n * k * 3 * 4))
    # training targets N=64
    kp = (torch.rand(64, 17, 2, generator=g) * torch.tensor([192.0, 256.0])).to(dev)
    vis = torch.ones(64, 17, device=dev)
    out.append(("gaussian_heatmap_targets N=64", lambda: dk.gaussian_heatmap_targets(kp, vis, (256, 192), (64, 48)),
                64 * 17 * 64 * 48 * 4))
    # end to end: DistilPose-S inference through the InferenceEngine (crop tensor -> keypoints)
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine

    model = build_model("distilpose_s").eval()
    cast_cl = {"cast_model": True, "channels_last": True}
    for batch, prec, flip, kw in ((256, "bf16", False, {}), (256, "bf16", False, {"cast_model": True}),
                                  (256, "bf16", False, cast_cl), (256, "bf16", False, {**cast_cl, "fuse_epilogues": False}),
                                  (1, "fp32", True, {"cuda_graph": True}),
                                  (1, "fp32", True, {"cuda_graph": True, "pdl": False}),
                                  (1, "fp32", True, {"cuda_graph": True, "fuse_epilogues": False, "fuse_pos_norm": False,
                                                     "fuse_mlp": False, "triton_linears": False,
                                                     "fuse_add_norm": False})):
        tag = " ".join(k if v is True else f"{k}={v}" for k, v in kw.items()) or "eager"
        name = f"e2e S b{batch} {prec} {'flip' if flip else 'noflip'} {tag}"
        if not want(name):
            continue
        eng = InferenceEngine(model, device=dev, precision=prec, flip_test=flip, fold_bn=True, clone_outputs=False, **kw)
        crops = torch.randn(batch, 3, 256, 192, generator=g).to(dev)
        center = torch.full((batch, 2), 200.0, device=dev)
        scale = torch.full((batch, 2), 150.0, device=dev)
        out.append((name, (lambda e=eng, c=crops, ce=center, sc=scale: e(c, ce, sc, device="cpu")), None))
    out += distill_cases(dev, g, want=want)
    return out


def distill_cases(dev: torch.device, g: torch.Generator, student: str = "distilpose_s",
                  teacher: str = "tokenpose_teacher", batch: int = 64,
                  want: Callable[[str], bool] = lambda name: True) -> List[tuple]:
    """The distillation step (student fwd + bwd, frozen teacher, Adam), bf16 autocast: the fused
    path and the fast-teacher paths (folded, bf16; NCHW with and without the conv epilogues,
    whose kernels tell why the fused epilogues were slower there on the H100; channels-last
    in a CUDA graph)."""
    from distilpose.models import build_model
    from distilpose.models.distiller import Distiller

    out = []
    fast = dict(fold_teacher_bn=True, teacher_dtype=torch.bfloat16)
    for label, kw in (("fused", {}), ("fastteacher", fast), ("fastteacher noepi", {**fast, "fuse_teacher_epilogues": False}),
                      ("fastteacher cl graph", {**fast, "teacher_channels_last": True, "teacher_cuda_graph": True})):
        if not want(f"e2e distill step b{batch} bf16 {label}"):
            continue
        s_model = build_model(student).to(dev).train()
        distiller = Distiller(s_model, build_model(teacher).to(dev), **kw).to(dev)
        opt = torch.optim.Adam(s_model.parameters(), lr=1e-4)
        data = {"img": torch.randn(batch, 3, *s_model.input_size, generator=g).to(dev),
                "target_coords": torch.rand(batch, 17, 2, generator=g).to(dev),
                "target_weight": torch.ones(batch, 17, 1, device=dev)}

        def step(d=distiller, o=opt, b=data):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = d(b)["loss"]
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            return loss.detach()

        out.append((f"e2e distill step b{batch} bf16 {label}", step, None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-host", action="store_true", help="skip the cProfile part")
    ap.add_argument("--e2e-first", action="store_true",
                    help="the end-to-end rows before the op rows (a stage cut short keeps those)")
    ap.add_argument("--only", default=None,
                    help="comma-separated name fragments: profile only the cases whose name contains one")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_ops: no CUDA device; nothing to profile")
        return 0
    dev = torch.device("cuda")
    rows = []
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": rows, "host": {}}

    def save():
        if args.json:
            atomic_write(args.json, json.dumps(report, indent=1))

    frags = [f.strip() for f in (args.only or "").split(",") if f.strip()]

    def want(name: str) -> bool:
        return not frags or any(f in name for f in frags)

    all_cases = [c for c in cases(dev, want=want) if want(c[0])]  # the op cases are always built
    if not all_cases:
        print(f"profile_ops: no case name contains any of {frags}", file=sys.stderr)
        return 2
    op_cases = [c for c in all_cases if not c[0].startswith("e2e")]
    e2e_cases = [c for c in all_cases if c[0].startswith("e2e")]

    def measure(name, fn, nbytes):
        wall = _wall(fn)
        ks, counts, sequence = _kernels(fn)
        dev_t = sum(ks.values())
        row = {"op": name, "wall_us": wall * 1e6, "kernel_us": dev_t * 1e6, "bytes": nbytes,
               "kernel_gbps": nbytes / dev_t / 1e9 if dev_t and nbytes else None,
               "kernels": {kname: v * 1e6 for kname, v in sorted(ks.items(), key=lambda kv: -kv[1])},
               "launches": {kname: round(counts[kname], 2) for kname in sorted(ks, key=lambda k: -ks[k])},
               "launches_per_call": round(sum(counts.values()), 1), "sequence": sequence}
        rows.append(row)
        top = ", ".join(f"{kn[:60]} {v:.1f}" for kn, v in list(row["kernels"].items())[:6])
        print(f"{name:<38} wall {row['wall_us']:8.1f} us  kernels {row['kernel_us']:8.1f} us "
              f"({row['kernel_gbps'] or 0:7.0f} GB/s)  [{top}]", flush=True)
        save()

    def op_rows() -> None:
        for case in op_cases:
            measure(*case)
        if not args.no_host:  # before the slow end-to-end rows: a short stage limit keeps it
            for name, fn, _ in op_cases:
                if not name.startswith(("token_attention fwd+bwd", "simulated_heatmap_loss",
                                        "gaussian_heatmap_targets")):
                    continue
                prof_rows = host_profile(fn)
                report["host"][name] = prof_rows
                print(f"host time, {name} (cProfile, us per call, own time):")
                for r in prof_rows:
                    print(f"  {r['own_us']:8.1f} {r['calls_per_call']:6.1f}x  {r['function'][:90]}", flush=True)
                save()

    def e2e_rows() -> None:
        for case in e2e_cases:
            measure(*case)

    for part in ((e2e_rows, op_rows) if args.e2e_first else (op_rows, e2e_rows)):
        part()
    report["auto_choices"] = dk.auto_choices()
    report["tuned_configs"] = dk.tuned_configs()
    save()
    print("fused-vs-reference decisions of the ops' \"auto\" backends (dk.auto_choices()):")
    for d in report["auto_choices"]:
        t = f"{d['fused_ms']:.4f} vs {d['reference_ms']:.4f} ms" if d["fused_ms"] is not None else ""
        print(f"  {d['use']:<9} {d['why'][:60]:<12} {t:<24} {d['op']} {d['key'][:90]}", flush=True)
    print("tiles the Triton autotuners picked (dk.tuned_configs()):")
    for tuner, picks in report["tuned_configs"].items():
        for key, cfg in picks.items():
            print(f"  {tuner:<40} {key[:60]:<60} {cfg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
