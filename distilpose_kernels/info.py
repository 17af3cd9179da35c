"""What was built, and what each op of distilpose_kernels dispatches to on this machine.

    python -m distilpose_kernels.info [--json]

or ``distilpose_kernels.info()`` (returns a dict and, with ``verbose=True``, prints it).
Loads the compiled extension (``_C``) but never imports Triton or the Triton kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from typing import Any, Optional

import torch

from . import _ext
from ._utils import (FORCE_REFERENCE_ENV, FP32_DOT_ENV, force_reference, fp32_dot_precision, select_triton_backend,
                     triton_available, triton_interpret)

#: Triton-backed ops of the library (dispatch: distilpose_kernels._utils.select_triton_backend).
TRITON_OPS = (
    "token_attention",
    "qkv_attention",
    "add_pos_layernorm",
    "simulated_heatmap_loss",
    "render_gaussian_heatmaps",
    "gaussian_heatmap_targets",
    "upsample_sum",
    "linear_gelu",
    "linear",
    "fused_mlp",
    "linear_add_norm",
    "fused_mlp_add_norm",
    "regression_to_image",
    "regression_head",
)
#: Ops backed by the compiled extension (distilpose_kernels/decode.py).
EXTENSION_OPS = ("soft_argmax", "decode_heatmaps")


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _extension_dispatch(device: str) -> tuple[str, str]:
    st = _ext.load()
    if force_reference():
        return "reference", f"{FORCE_REFERENCE_ENV}=1"
    if _ext.available(device):
        return ("cpp" if device == "cpu" else "cuda"), f"compiled kernels in {os.path.basename(st.path or '_C')}"
    if not st.loaded:
        return "reference", f"extension not loaded: {st.error}"
    return "reference", "extension built without CUDA (rebuild with FORCE_CUDA=1 on a CUDA machine)"


def _conv_epilogue_dispatch(device: str) -> tuple[str, str]:
    from .conv_epilogue import AUTOTUNE_ENV, CUDNN_DTYPES  # no GPU query, no Triton

    if force_reference():
        return "reference", f"{FORCE_REFERENCE_ENV}=1"
    if device != "cuda":
        return "reference", "CPU tensors (F.conv2d + add + ReLU, in place without autograd)"
    if not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return "reference", "cuDNN is not available or torch.backends.cudnn.enabled is False"
    dts = "/".join(str(d).replace("torch.", "") for d in CUDNN_DTYPES)
    from . import conv_epilogue

    if not conv_epilogue.AUTOTUNE:
        return "cudnn", f"fused cuDNN conv+bias(+add)+ReLU for {dts}, untimed ({AUTOTUNE_ENV}=0)"
    return "cudnn|triton|reference", (f"fused cuDNN conv+bias(+add)+ReLU for {dts} where timed faster and equal; "
                                      "the Triton kernel for short reductions (Cin*kh*kw <= "
                                      f"{conv_epilogue.TRITON_MAX_REDUCTION}) where timed faster still "
                                      "(once per shape, outside CUDA-graph capture)")


def _triton_dispatch(op: str, device: str) -> tuple[str, str]:
    probe = torch.empty(0, device=device)
    backend = select_triton_backend(op, [probe], None)
    if backend == "triton":
        return "triton", "CUDA tensors and Triton is installed (within the op's own dtype/shape limits)"
    if force_reference():
        why = f"{FORCE_REFERENCE_ENV}=1"
    elif not triton_available():
        why = "Triton is not installed"
    elif device != "cuda":
        state = "set" if triton_interpret() else "not set"
        why = f"CPU tensors (backend='triton' runs the kernels under TRITON_INTERPRET=1, which is {state})"
    else:
        why = "reference selected"
    return backend, why


#: environment switches of the kernels: (variable, default, what it does)
SWITCHES = (
    ("DISTILPOSE_ATTN_AUTOTUNE", "1", "autotune the attention kernels' blocks on the GPU"),
    ("DISTILPOSE_HEATMAP_AUTOTUNE", "1", "time the loss forward's launch shapes on the GPU"),
    ("DISTILPOSE_CONV_EPILOGUE_AUTOTUNE", "1", "time cuDNN's fused conv epilogue against the unfused ops on the GPU"),
    ("DISTILPOSE_LINEAR_GELU_AUTOTUNE", "1", "time the Triton GEMMs (linear_gelu, linear, fused_mlp, *_add_norm) against cuBLAS on the GPU"),
    (FP32_DOT_ENV, "auto", "float32 dots in the Triton kernels: auto (3xTF32 on sm_80+, else ieee), ieee, tf32x3"),
    ("DISTILPOSE_SOFTARGMAX_VEC", "1", "vectorised CUDA soft-argmax forward (0: the scalar kernels)"),
    ("DISTILPOSE_SIMHM_FWD", "auto", "the CUDA loss forward: auto (the fastest, timed once per shape), blocks (one block per map), persistent, pipelined"),
    ("DISTILPOSE_NVTX", "0", "NVTX ranges around ops and model stages (read at import)"),
    ("DISTILPOSE_PDL", "0", "programmatic dependent launch of the forward Triton kernels on sm_90+ (read at the first "
                            "launch; InferenceEngine's CUDA graphs decide by timing)"),
)


def _switches() -> dict[str, dict[str, str]]:
    return {name: {"value": os.environ.get(name, default), "default": default, "what": what}
            for name, default, what in SWITCHES}


def info(verbose: bool = False) -> dict[str, Any]:
    """Build and dispatch report (see module docstring)."""
    st = _ext.load()
    built_cmp = None
    if st.built_with_torch is not None:
        runtime = torch.__version__.split("+")[0]
        built_cmp = "same" if runtime == st.built_with_torch else f"MISMATCH (runtime {runtime})"
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "triton_installed": triton_available(),
        "triton_interpret": triton_interpret(),
        "force_reference": force_reference(),
        "extension": {
            "loaded": st.loaded,
            "path": st.path,
            "error": st.error,
            "kernels": list(st.dispatch_keys),
            "cuda_built": st.cuda_built,
            "cuda_archs": st.cuda_archs,
            "built_with_torch": st.built_with_torch,
            "torch_match": built_cmp,
        },
        "dispatch": {},
        "switches": _switches(),
        "fp32_dot": {},
        "pdl": {},
    }
    for dev in _devices():
        table = {}
        for op in EXTENSION_OPS:
            table[op] = dict(zip(("backend", "why"), _extension_dispatch(dev)))
        table["flip_heatmaps"] = {"backend": "pytorch", "why": "indexing only (no kernel needed)"}
        for op in TRITON_OPS:
            table[op] = dict(zip(("backend", "why"), _triton_dispatch(op, dev)))
        if dev == "cuda" and not force_reference():
            from .heatmap import extension_loss_available

            if extension_loss_available("cuda"):
                table["simulated_heatmap_loss"] = {
                    "backend": "cuda", "why": "the extension's kernels with C++ autograd (backend='triton': Triton)"}
            from .targets import extension_targets_available

            if extension_targets_available("cuda"):
                table["gaussian_heatmap_targets"] = {
                    "backend": "cuda", "why": "the extension's kernel: one dispatcher call (backend='triton': Triton)"}
        table["conv2d_relu"] = dict(zip(("backend", "why"), _conv_epilogue_dispatch(dev)))
        report["dispatch"][dev] = table
        try:
            report["fp32_dot"][dev] = fp32_dot_precision(torch.device(dev))
        except ValueError as e:  # a bad DISTILPOSE_FP32_DOT: report it, the ops will raise it
            report["fp32_dot"][dev] = f"error: {e}"
        # the device's side only: checking Triton's launch_pdl would import Triton here
        report["pdl"][dev] = dev == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    if verbose:
        print(format_info(report))
    return report


def format_info(report: dict[str, Any]) -> str:
    ext = report["extension"]
    lines = [
        f"torch {report['torch']} (CUDA {report['torch_cuda']}), cuda available: {report['cuda_available']}"
        + (f" {report['devices']}" if report["devices"] else ""),
        f"triton installed: {report['triton_installed']}, TRITON_INTERPRET: {report['triton_interpret']}, "
        f"{FORCE_REFERENCE_ENV}: {report['force_reference']}",
    ]
    if ext["loaded"]:
        lines.append(f"extension distilpose_kernels._C: built, kernels for {', '.join(ext['kernels'])}"
                     + (f" (archs {ext['cuda_archs']})" if ext["cuda_archs"] else "")
                     + f"; built with torch {ext['built_with_torch']} ({ext['torch_match']})")
        lines.append(f"  {ext['path']}")
    else:
        lines.append(f"extension distilpose_kernels._C: not available: {ext['error']}")
    lines.append("switches: " + ", ".join(f"{k}={v['value']}" for k, v in report.get("switches", {}).items()))
    if report.get("fp32_dot"):
        lines.append("float32 dots in the Triton kernels (tl.dot input_precision): "
                     + ", ".join(f"{dev} {p}" for dev, p in report["fp32_dot"].items()))
    if report.get("pdl"):
        lines.append("programmatic dependent launch (sm_90+ GPUs): "
                     + ", ".join(f"{dev} {'yes' if ok else 'no'}" for dev, ok in report["pdl"].items()))
    for dev, table in report["dispatch"].items():
        lines.append(f"dispatch for {dev} tensors:")
        width = max(len(op) for op in table)
        for op, d in table.items():
            lines.append(f"  {op:<{width}}  {d['backend']:<9}  {d['why']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilpose_kernels.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


class _CallableModule(types.ModuleType):
    """``distilpose_kernels.info`` names both this module and the function (lazy export):
    make the module callable so ``distilpose_kernels.info()`` works either way."""

    def __call__(self, verbose: bool = False) -> dict[str, Any]:
        return info(verbose)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
