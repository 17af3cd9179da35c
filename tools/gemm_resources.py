"""Static resources of the TDE GEMM kernels' autotune tiles for sm_90 (H100/H200), without a GPU.

    python tools/gemm_resources.py [--only linear_add_norm] [--precision tf32x3] [--json out.json]

Every tile the GPU autotuner of ``distilpose_kernels.mlp_triton`` may pick (``linear`` /
``linear_gelu``, ``linear_add_norm``, ``fused_mlp`` with and without the add + LayerNorm
epilogue) is compiled by Triton for sm_90 at the TDE's widths (192 -> 576 -> 192), in bf16 and in
fp32 with 3xTF32 and FMA dots. ``cuobjdump`` reads the cubin's registers, stack frame and local memory
(register spills), Triton's metadata its (dynamic) shared memory; from those, the programs (blocks) that fit on one SM at once. The
last column is the number of programs the TDE's shape launches per SM at batch 1 with flip
(546 token rows) and at batch 256 (69,888 rows): below 1 the GPU is partly idle.

A tile that spills to local memory, or fits fewer than one program per SM, is a bad candidate:
the autotuner would time it, but it costs a compile and may win only by noise. This is a model,
not a timing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

os.environ.pop("TRITON_INTERPRET", None)  # compile real code
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_resources import occupancy, resources  # noqa: E402

from distilpose.fileio import atomic_write  # noqa: E402

SM_COUNT = {"H100 SXM": 132, "H200": 132}
ROWS = {"546 rows (b1 flip)": 546, "69888 rows (b256)": 256 * 273}  # token rows of the TDE's GEMMs
TDE = dict(C=192, HID=576)


def _compile(fn, ptr_type: str, ptr_names, scalar_types: Dict[str, str], consts: Dict[str, object], num_warps: int,
             num_stages: int, ints: Dict[str, int]):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "USE_PDL" in fn.arg_names:  # programmatic dependent launch: off unless given
        consts = {"USE_PDL": False, **consts}
    sig = {n: ("constexpr" if n in consts else (ptr_type if n in ptr_names else scalar_types.get(n, "i32")))
           for n in fn.arg_names}
    # Triton's launcher specialises 16-byte aligned pointers and ints divisible by 16 at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                            num_stages=num_stages))


def candidates():
    """(kernel name, tile, dtype, precision, compile thunk, rows per program, columns per program)."""
    import distilpose_kernels.mlp_triton as mt

    C, HID = TDE["C"], TDE["HID"]
    variants = [("bf16", "*bf16", "tf32"), ("fp32", "*fp32", "tf32x3"), ("fp32", "*fp32", "ieee")]
    for dt, p, prec in variants:
        for t in mt.TUNE_TILES + mt.SPLIT_TILES:
            for gelu, (n, k) in ((True, (HID, C)), (False, (C, HID)), (False, (3 * C, C))):
                consts = dict(HAS_B=True, GELU=gelu, PRECISION=prec, UPCAST=False, GROUP_M=8, **mt._gemm_config(t))
                name = f"linear{'_gelu' if gelu else ''}{' split' if t.split_k > 1 else ''} N={n} K={k}"
                yield (name, t._asdict(), dt, prec,
                       lambda t=t, consts=consts, n=n, k=k: _compile(
                           mt._linear_gelu_kernel, p, ("X", "Wt", "B", "Y"), dict(WS="*fp32", CNT="*i32"), consts,
                           t.num_warps, t.num_stages, dict(N=n, K=k, sxm=k, swn=k, sym=n)),
                       t.block_m, t.block_n, n * t.split_k)
        for t in mt.ADD_NORM_TUNE_TILES + mt.ADD_NORM_SPLIT_TILES:
            split = isinstance(t, mt.SplitTile)
            for k in ((C, HID) if split else (C,)):
                consts = dict(HAS_BIAS=True, HAS_POS=True, HAS_W=True, HAS_B=True, PRECISION=prec, UPCAST=False,
                              BLOCK_N=256, **mt._add_norm_config(t))
                yield (f"linear_add_norm{' split' if split else ''} N=192 K={k}", t._asdict(), dt, prec,
                       lambda t=t, consts=consts, k=k: _compile(
                           mt._linear_add_norm_kernel, p, ("X", "Wt", "B", "RES", "POS", "LNW", "LNB", "XO", "Y"),
                           dict(eps="fp32", WS="*fp32", CNT="*i32"), consts, t.num_warps, t.num_stages,
                           dict(N=C, K=k, sxm=k, swn=k)),
                       t.block_m, t.tile_n if split else C, C * (t.split_k if split else 1))
        for t in mt.MLP_TUNE_TILES + mt.MLP_SPLIT_TILES:
            split = isinstance(t, mt.SplitMlpTile)
            for add_norm in (False, True):
                consts = dict(HAS_B1=True, HAS_B2=True, ADD_NORM=add_norm, HAS_POS=add_norm, HAS_W=add_norm,
                              HAS_B=add_norm, PRECISION=prec, UPCAST=False, BLOCK_K=64, BLOCK_N=256,
                              **mt._mlp_config(t))
                yield (f"fused_mlp{'_add_norm' if add_norm else ''}{' split' if split else ''} 192-576-192",
                       t._asdict(), dt, prec,
                       lambda t=t, consts=consts: _compile(
                           mt._mlp_kernel, p, ("X", "W1", "B1", "W2", "B2", "Y", "RES", "POS", "LNW", "LNB", "XO"),
                           dict(eps="fp32", WS="*fp32", CNT="*i32"), consts, t.num_warps, t.num_stages,
                           dict(K=C, HID=HID, N=C, sxm=C, s1h=C, s2n=HID, sym=C)),
                       t.block_m, C, C * (t.split_h if split else 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--only", help="substring of the kernel name")
    ap.add_argument("--precision", choices=["tf32", "tf32x3", "ieee"],
                    help="one dot precision only (tf32: the bf16 tiles)")
    args = ap.parse_args(argv)
    import triton

    sms = SM_COUNT["H200"]
    rows: List[dict] = []
    print(f"TDE GEMM tiles compiled for sm_90 (static, no GPU; Triton {triton.__version__}); "
          f"'progs/SM' = programs resident per SM, the last columns = programs the TDE's GEMM launches per SM ({sms} SMs)")
    head = (f"{'kernel':<34} {'dtype':<5} {'dot':<6} {'tile':<18} {'regs':>4} {'stack':>5} {'local':>5} {'smem KB':>7} "
            f"{'progs/SM':>8} " + " ".join(f"{k:>18}" for k in ROWS))
    print(head)
    for name, tile, dt, prec, build, bm, bn, n_total in candidates():
        if (args.only and args.only not in name) or (args.precision and args.precision != prec):
            continue
        kernel = build()
        r = resources(kernel.asm["cubin"])
        r["shared"] = max(r["shared"], kernel.metadata.shared)  # Triton's shared memory is dynamic
        threads = 32 * tile["num_warps"]
        resident = occupancy(r["regs"], threads, r["shared"])
        launched = {k: math.ceil(m / bm) * math.ceil(n_total / bn) / sms for k, m in ROWS.items()}
        tile_s = "x".join(str(v) for v in tile.values())
        rows.append(dict(kernel=name, dtype=dt, precision=prec, tile=tile, regs=r["regs"], spill_bytes=r["local"],
                         stack=r["stack"], shared=r["shared"], programs_per_sm=resident,
                         programs_launched_per_sm=launched))
        print(f"{name:<34} {dt:<5} {prec:<6} {tile_s:<18} {r['regs']:>4} {r['stack']:>5} {r['local']:>5} {r['shared'] / 1024:>7.1f} "
              f"{resident:>8} " + " ".join(f"{v:>18.2f}" for v in launched.values()))
    bad = [r for r in rows if r["spill_bytes"] or r["stack"] or r["programs_per_sm"] < 1]
    print(f"{len(rows)} tiles; {len(bad)} use a stack frame (register spills) or local memory, or do not fit: "
          + ", ".join(f"{r['kernel']} {r['dtype']}/{r['precision']} {tuple(r['tile'].values())}" for r in bad))
    if args.json:
        atomic_write(args.json, json.dumps(dict(target="sm_90", triton=triton.__version__, tde=TDE, rows=ROWS,
                                                tiles=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
