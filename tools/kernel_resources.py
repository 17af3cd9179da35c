"""Static resources of the simulated-heatmap loss forward's tuning candidates, without a GPU.

    python tools/kernel_resources.py [--hw 64 48] [--dtype fp32] [--json out.json]

Each candidate (``heatmap_triton.tile_candidates``) is compiled by Triton for sm_90 (H100/H200)
on this machine; ``cuobjdump`` (shipped with Triton) reads the cubin's registers, spills and
shared memory, and its SASS gives the global-load instructions by width. From those:

- resident programs per SM: limited by the 64K-register file, 2048 threads, 32 blocks and
  228 KB of shared memory (sm_90);
- teacher bytes in flight per SM: resident programs x the teacher bytes one program has in
  flight before its first use of a loaded value (read from the SASS: ptxas may split a
  tile's loads into groups; lanes past W are masked off).

A memory-bound kernel needs roughly bandwidth x latency in flight (about 30 KB per SM on an
H200 at ~0.8 us); far below that it cannot reach the copy bandwidth however fast its arithmetic.
This is a model, not a timing: the GPU tuner (``_tuned_tile``) times the candidates.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

os.environ.pop("TRITON_INTERPRET", None)  # compile real code
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from distilpose.fileio import atomic_write  # noqa: E402

SM90 = dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, reg_alloc_unit=256)


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def compile_candidate(tile, h: int, w: int, teacher: str = "fp32", nk: int = 256 * 17):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distilpose_kernels import heatmap_triton as k

    p = "*fp32"
    sig = dict(coords_ptr=p, sigma_ptr=p, score_ptr=p, teacher_ptr="*" + teacher, kw_ptr=p, stats_ptr=p,
               NK="i32", H="i32", W="i32", HW="i32")
    consts = dict(BLOCK_H=tile.block_h, BLOCK_W=tile.block_w)
    fn = k._simhm_loss_fwd_kernel
    if tile.maps:
        fn = k._simhm_loss_fwd_whole_kernel
        consts["MAPS"] = tile.maps
    sig.update({n: "constexpr" for n in consts})
    sig = {n: sig[n] for n in fn.arg_names}  # the kernel's parameter order (constexprs are positional)
    # Triton's launcher specialises pointers (16-byte aligned from torch) and ints divisible by 16
    # as "divisible by 16" at run time; give the same hints, or the loads would not vectorise here.
    ints = dict(NK=nk, H=h, W=w, HW=h * w)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tile.num_warps})


def resources(cubin: bytes) -> Dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output: {usage[-300:]}")
    regs, stack, shared, local = (int(x) for x in m.groups())
    loads: Dict[str, int] = {}
    for ins in re.findall(r"\bLDG\.E(?:\.[A-Z0-9]+)*", sass):
        width = next((p for p in ins.split(".")[2:] if p.isdigit()), "32")
        loads[width] = loads.get(width, 0) + 1
    return dict(regs=regs, stack=stack, shared=shared, local=local, ldg_by_width=loads,
                wide_bytes_before_first_use=_wide_bytes_before_first_use(sass))


def _wide_bytes_before_first_use(sass: str) -> int:
    """Bytes per thread of the vector (64/128-bit) global loads issued before the first
    instruction that reads a register one of them loaded: how much of the tile a thread has
    in flight at once (ptxas may split a tile's loads into groups around arithmetic)."""
    pending: set = set()
    issued = 0
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?P\d\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if not m:
            continue
        op, operands = m.groups()
        regs = [int(r) for r in re.findall(r"\bR(\d+)\b", operands)]
        if op.startswith("LDG.E.") and op.split(".")[-1] in ("64", "128"):
            width = int(op.split(".")[-1]) // 32
            pending.update(range(regs[0], regs[0] + width))
            issued += width * 4
            continue
        srcs = regs[1:] if op not in ("STG.E", "STS", "BAR.SYNC.DEFER_BLOCKING") else regs
        if pending and any(r in pending for r in srcs):
            return issued
    return issued


def occupancy(regs: int, threads: int, shared: int) -> int:
    unit = SM90["reg_alloc_unit"]
    per_warp = -(-regs * 32 // unit) * unit
    by_regs = SM90["regs"] // (per_warp * (threads // 32))
    by_threads = SM90["threads"] // threads
    by_smem = SM90["smem"] // shared if shared else SM90["blocks"]
    return max(0, min(by_regs, by_threads, by_smem, SM90["blocks"]))


def _nvcc_sass(source: str, headers: str) -> tuple:
    """Compile csrc/cuda/<source> for sm_90 with nvcc (the extension's flags) -> (cuobjdump
    resource usage, SASS) text."""
    root = Path(__file__).resolve().parents[1]
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    ti = Path(headers) / "torch" / "include"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        subprocess.run(
            [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90,code=sm_90", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "--expt-relaxed-constexpr", "-I", str(root / "csrc"), "-I", str(ti), "-DDISTILPOSE_WITH_CUDA=1",
             "-cubin", str(root / "csrc" / "cuda" / source), "-o", str(cubin)],
            check=True, capture_output=True, text=True)
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return usage, sass


def _sass_by_function(sass: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current and re.match(r"\s+/\*[0-9a-f]{4}\*/", line):
            out[current].append(line)
    return out


def simhm_loss_static(headers: str) -> List[dict]:
    """Compile csrc/cuda/simhm_loss_cuda.cu for sm_90 and read, for each vector-load instance of
    the loss forward, its registers and stack, and where in the SASS the map's first 16-byte
    load sits against the first reciprocal (MUFU.RCP: the 1 / sigma^2 that needs the prediction
    loaded). Before it: the map's loads are in flight while the prediction is read (one memory
    round trip per map); after it: two round trips, one after the other."""
    usage, sass = _nvcc_sass("simhm_loss_cuda.cu", headers)
    res = {m.group(1): (int(m.group(2)), int(m.group(3)))
           for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", usage)}
    rows = []
    for name, lines in _sass_by_function(sass).items():
        mp = re.search(r"simhm_loss_fwd_(persistent|pipelined)_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)E", name)
        if mp:  # the persistent / pipelined forms: their resources (they request maps ahead by design)
            regs, stack = res.get(name, (0, 0))
            async_copies = sum("LDGSTS" in ln for ln in lines)  # cp.async: the pipelined form's copies
            extra = {}
            if mp.group(1) == "pipelined":  # 256 threads, 3 stages of a 64 x 48 map, 640 B of reduction scratch
                smem = 3 * 64 * 48 * {"f": 4}.get(mp.group(2), 2) + 640
                extra = dict(threads=256, shared_64x48=smem, blocks_per_sm_64x48=occupancy(regs, 256, smem + 1024))
            rows.append(dict(kernel=f"simhm_loss_fwd_{mp.group(1)}", async_copies=async_copies, **extra,
                             dtype={"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}[mp.group(2)],
                             vector=int(mp.group(3)), regs=regs, stack=stack, first_map_load=None, first_rcp=None,
                             map_loads_first=None))
            continue
        m = re.search(r"simhm_loss_fwd_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)E", name)
        if not m or m.group(2) == "1":
            continue
        dtype = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}[m.group(1)]
        first_load = next((i for i, ln in enumerate(lines) if "LDG.E.128" in ln), None)
        first_rcp = next((i for i, ln in enumerate(lines) if "MUFU.RCP" in ln), None)
        regs, stack = res.get(name, (0, 0))
        rows.append(dict(kernel="simhm_loss_fwd", dtype=dtype, vector=int(m.group(2)), regs=regs, stack=stack,
                         first_map_load=first_load, first_rcp=first_rcp,
                         map_loads_first=first_load is not None and first_rcp is not None and first_load < first_rcp))
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"]))


def soft_argmax_static(headers: str) -> List[dict]:
    """Compile csrc/cuda/decode_cuda.cu for sm_90 with nvcc and read, for each soft-argmax
    forward instance, its registers and SASS length; the slope of the length between ITEMS
    instances is the straight-line code per pixel (the per-map overhead cancels)."""
    usage, sass = _nvcc_sass("decode_cuda.cu", headers)
    regs = dict(re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", usage))
    lengths = {name: len(lines) for name, lines in _sass_by_function(sass).items()}
    rows = []
    for name, n in lengths.items():
        m = re.search(r"soft_argmax_fwd_(reg|vec)_kernelI(f|6__half|13__nv_bfloat16)(?:f)?Li(\d+)E", name)
        if m:
            kind, t, items = m.groups()
            dtype = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}[t]
            px = int(items) * (1 if kind == "reg" else (4 if dtype == "fp32" else 8))
            rows.append(dict(kernel=kind, dtype=dtype, items=int(items), pixels_per_thread=px, sass=n,
                             regs=int(regs.get(name, 0))))
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["items"]))
    for kind in ("reg", "vec"):
        for dt in ("fp32", "fp16", "bf16"):
            rs = [r for r in rows if r["kernel"] == kind and r["dtype"] == dt]
            for a, b in zip(rs, rs[1:]):
                b["sass_per_pixel"] = (b["sass"] - a["sass"]) / (b["pixels_per_thread"] - a["pixels_per_thread"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hw", type=int, nargs=2, default=(64, 48), metavar=("H", "W"))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--nk", type=int, default=256 * 17, help="N*K (its divisibility by 16 is specialised)")
    ap.add_argument("--json")
    ap.add_argument("--soft-argmax", action="store_true",
                    help="the CUDA soft-argmax forward kernels instead (nvcc; torch headers as in "
                         "tools/check_cuda_compile.sh)")
    ap.add_argument("--simhm-loss", action="store_true",
                    help="the CUDA loss forward kernels instead (nvcc): do the map's loads come before the "
                         "math that needs the prediction?")
    ap.add_argument("--headers", default=os.environ.get("DISTILPOSE_CUDA_HEADERS", ".cuda_headers"),
                    help="folder holding torch/include of a CUDA torch wheel (tools/check_cuda_compile.sh fetches it)")
    args = ap.parse_args(argv)
    if args.simhm_loss:
        rows = simhm_loss_static(args.headers)
        print("CUDA loss forward, compiled for sm_90 (static, no GPU): SASS index of the map's first 16-byte load "
              "vs the first MUFU.RCP (needs the prediction)")
        for r in rows:
            if r["kernel"] != "simhm_loss_fwd":
                occ = (f", {r['blocks_per_sm_64x48']} blocks/SM at 64 x 48 ({r['shared_64x48']} B shared), "
                       f"{r['async_copies']} cp.async sites" if "blocks_per_sm_64x48" in r else "")
                print(f"{r['dtype']:>5} x{r['vector']}: {r['regs']} regs, stack {r['stack']} ({r['kernel']}){occ}")
                continue
            print(f"{r['dtype']:>5} x{r['vector']}: {r['regs']} regs, stack {r['stack']}, first map load "
                  f"{r['first_map_load']}, first RCP {r['first_rcp']}: "
                  f"{'map loads first' if r['map_loads_first'] else 'prediction first (two round trips)'}")
        if args.json:
            atomic_write(args.json, json.dumps(dict(target="sm_90", kernels=rows), indent=1))
        main_rows = [r for r in rows if r["kernel"] == "simhm_loss_fwd"]
        return 0 if main_rows and all(r["map_loads_first"] for r in main_rows) else 1
    if args.soft_argmax:
        rows = soft_argmax_static(args.headers)
        print("CUDA soft-argmax forward, compiled for sm_90 (static, no GPU): SASS per pixel = slope between ITEMS")
        print(f"{'kernel':>6} {'dtype':>5} {'items':>5} {'px/thread':>9} {'regs':>5} {'SASS':>5} {'SASS/px':>8}")
        for r in rows:
            spp = r.get("sass_per_pixel")
            print(f"{r['kernel']:>6} {r['dtype']:>5} {r['items']:>5} {r['pixels_per_thread']:>9} {r['regs']:>5} "
                  f"{r['sass']:>5} {'' if spp is None else f'{spp:8.1f}'}")
        if args.json:
            atomic_write(args.json, json.dumps(dict(target="sm_90", kernels=rows), indent=1))
        return 0
    from distilpose_kernels import heatmap_triton as k

    h, w = args.hw
    elt = 4 if args.dtype == "fp32" else 2
    rows: List[dict] = []
    for tile in k.tile_candidates(h, w):
        kernel = compile_candidate(tile, h, w, args.dtype, args.nk)
        r = resources(kernel.asm["cubin"])
        r["shared"] = max(r["shared"], kernel.metadata.shared)  # cuobjdump sees static shared memory only
        threads = 32 * tile.num_warps
        resident = occupancy(r["regs"], threads, r["shared"])
        valid_h, valid_w = min(h, tile.block_h), min(w, tile.block_w)
        per_program = valid_h * valid_w * elt * max(1, tile.maps)  # a tile of every map, if all in flight
        first = r["wide_bytes_before_first_use"] * threads * valid_w / tile.block_w  # lanes past W are masked
        # only vector loads are told apart from the per-map scalar parameter loads: with scalar
        # tile loads (W not a multiple of 16 / the pointer not 16-byte aligned) the model says n/a
        inflight = resident * min(per_program, first) / 1024 if first else None
        rows.append(dict(tile=tile._asdict(), **r, programs_per_sm=resident, warps_per_sm=resident * tile.num_warps,
                         inflight_kb_per_sm=inflight))
    print(f"loss forward candidates, {h}x{w} {args.dtype} teacher, compiled for sm_90 (static, no GPU)")
    print(f"{'maps':>4} {'BH':>4} {'BW':>4} {'warps':>5} {'regs':>5} {'spill':>5} {'prog/SM':>7} {'warps/SM':>8} "
          f"{'KB in flight/SM':>15}  LDG by width")
    for r in rows:
        t = r["tile"]
        print(f"{t['maps']:>4} {t['block_h']:>4} {t['block_w']:>4} {t['num_warps']:>5} {r['regs']:>5} {r['local']:>5} "
              f"{r['programs_per_sm']:>7} {r['warps_per_sm']:>8} "
              f"{'n/a' if r['inflight_kb_per_sm'] is None else format(r['inflight_kb_per_sm'], '.1f'):>15}  "
              f"{r['ldg_by_width']}")
    if args.json:
        atomic_write(args.json, json.dumps(dict(h=h, w=w, dtype=args.dtype, target="sm_90", candidates=rows),
                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
