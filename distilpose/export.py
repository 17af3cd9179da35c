"""Deployment: export a pose model to ONNX (checked with onnxruntime) or a ``torch.export`` program.

    distilpose export --preset distilpose_s --checkpoint ckpt.pth --out model.onnx --check
    distilpose export --checkpoint ckpt.pth --out model.pt2          # torch.export program

The exported graph takes normalised crops ``img`` (N, 3, 256, 192) float32 (batch dynamic
unless ``--static-batch``) and returns, for a student, ``coords`` (N, K, 2) crop-normalised
(x / 192, y / 256), ``score`` (N, K, 1) and ``sigma`` (N, K, 2); for a teacher, ``heatmaps``
(N, K, 64, 48). ``--flip-test`` puts the flip test inside the graph (student only).
Conv+BN pairs are folded by default. The export runs on the CPU through the pure-PyTorch
reference ops (fused Triton/CUDA kernels are not ONNX operators); the result is the same
function.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .fileio import replace_into, staging_dir

__all__ = ["ExportWrapper", "check_onnx", "export_onnx", "export_program", "add_arguments", "run"]

DEFAULT_OPSET = 17


class ExportWrapper(nn.Module):
    """Tuple-output view of a pose model for export: img -> (coords, score, sigma) or (heatmaps,)."""

    def __init__(self, model: nn.Module, flip_test: bool = False, flip_pairs: Optional[Sequence[Tuple[int, int]]] = None):
        super().__init__()
        from .runtime import COCO_FLIP_PAIRS, flip_index

        self.model = model
        self.kind = model.kind
        if flip_test and self.kind != "student":
            raise ValueError("flip_test: only the student's export supports an in-graph flip test")
        self.flip_test = flip_test
        self.register_buffer(
            "perm", torch.tensor(flip_index(model.num_keypoints, flip_pairs or COCO_FLIP_PAIRS)), persistent=False
        )

    @property
    def output_names(self) -> List[str]:
        return ["coords", "score", "sigma"] if self.kind == "student" else ["heatmaps"]

    def forward(self, img: torch.Tensor):
        if self.kind != "student":
            return (self.model(img)["heatmaps"],)
        if not self.flip_test:
            out = self.model(img)
            return out["coords"], out["score"], out["sigma"]
        n = img.shape[0]
        out = self.model(torch.cat((img, img.flip(-1)), dim=0))
        c, cf = out["coords"][:n], out["coords"][n:].index_select(1, self.perm)
        cf = torch.stack((1.0 - cf[..., 0], cf[..., 1]), dim=-1)
        s, sf = out["score"][:n], out["score"][n:].index_select(1, self.perm)
        g, gf = out["sigma"][:n], out["sigma"][n:].index_select(1, self.perm)
        return (c + cf) * 0.5, (s + sf) * 0.5, (g + gf) * 0.5


@contextlib.contextmanager
def _reference_ops():
    """Force the pure-PyTorch reference path of every op while exporting."""
    from distilpose_kernels._utils import FORCE_REFERENCE_ENV

    old = os.environ.get(FORCE_REFERENCE_ENV)
    os.environ[FORCE_REFERENCE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORCE_REFERENCE_ENV, None)
        else:
            os.environ[FORCE_REFERENCE_ENV] = old


def _prepare(model: nn.Module, fold_bn: bool, flip_test: bool) -> ExportWrapper:
    import copy

    from .runtime import _set_attention_backend

    if getattr(model, "kind", None) not in ("student", "teacher"):
        raise ValueError("model: expected a TokenPoseModel (kind 'student' or 'teacher')")
    model = copy.deepcopy(model).cpu().float().eval()
    _set_attention_backend(model, "reference")
    if hasattr(model, "check_finite"):
        model.check_finite = False
    if fold_bn:
        from .fuse import fuse_conv_bn_model

        model = fuse_conv_bn_model(model, inplace=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return ExportWrapper(model, flip_test=flip_test).eval()


def _check_batch(batch: int) -> None:
    if int(batch) < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")


def _example(model: nn.Module, batch: int) -> torch.Tensor:
    h, w = getattr(model, "input_size", (256, 192))
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def _atomic_target(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=staging_dir(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    return tmp


def export_onnx(
    model: nn.Module,
    path: str,
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    dynamic_batch: bool = True,
    fold_bn: bool = True,
    flip_test: bool = False,
) -> str:
    """Export ``model`` to ONNX at ``path`` (written atomically) with the dynamo exporter."""
    import onnx

    _check_batch(batch)
    wrapper = _prepare(model, fold_bn, flip_test)
    # a dynamic axis cannot be traced at size 1 (export specialises 0/1 sizes)
    x = _example(model, max(batch, 2) if dynamic_batch else batch)
    dynamic_shapes = {"img": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    tmp = _atomic_target(path)
    try:
        with _reference_ops(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (x,),
                tmp,
                input_names=["img"],
                output_names=wrapper.output_names,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(tmp)
        got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
        if got != opset:
            raise RuntimeError(f"opset: asked for {opset}, the exporter produced {got}")
        onnx.checker.check_model(proto)
        replace_into(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_onnx(
    path: str,
    model: nn.Module,
    batches: Sequence[int] = (1, 3),
    flip_test: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Dict[str, float]:
    """Run the ONNX file with onnxruntime (CPU) and compare with PyTorch on random crops.

    The PyTorch side is the unfolded model (reference ops, fp32), so folding is checked too.
    Returns {output name: max abs error}; raises AssertionError when outside tolerance.
    """
    import numpy as np
    import onnxruntime as ort

    ref = _prepare(model, fold_bn=False, flip_test=flip_test)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    errs: Dict[str, float] = {}
    gen = torch.Generator().manual_seed(1)
    h, w = getattr(model, "input_size", (256, 192))
    for b in batches:
        x = torch.randn(b, 3, h, w, generator=gen)
        got = sess.run(None, {in_name: x.numpy()})
        with torch.no_grad(), _reference_ops():
            want = ref(x)
        for name, g, t in zip(ref.output_names, got, want):
            t = t.numpy()
            if g.shape != t.shape:
                raise AssertionError(f"onnx output {name}: shape {g.shape}, PyTorch {t.shape}")
            err = float(np.abs(g - t).max())
            errs[name] = max(errs.get(name, 0.0), err)
            if not np.allclose(g, t, rtol=rtol, atol=atol):
                raise AssertionError(f"onnx output {name} (batch {b}): max abs error {err:.3g} > atol {atol} / rtol {rtol}")
    return errs


def export_program(
    model: nn.Module,
    path: Optional[str] = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    fold_bn: bool = True,
    flip_test: bool = False,
) -> "torch.export.ExportedProgram":
    """``torch.export`` the model (reference ops, CPU); saved with ``torch.export.save`` when ``path`` is given."""
    _check_batch(batch)
    wrapper = _prepare(model, fold_bn, flip_test)
    x = _example(model, max(batch, 2) if dynamic_batch else batch)
    dynamic_shapes = {"img": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    with _reference_ops():
        prog = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes, strict=False)
    if path is not None:
        tmp = _atomic_target(path)
        try:
            torch.export.save(prog, tmp)
            replace_into(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return prog


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset (default: the checkpoint's meta.preset)")
    p.add_argument("--checkpoint", default=None, help="our checkpoint or an original-release file")
    p.add_argument("--out", required=True, help="output file: .onnx (ONNX) or .pt2 (torch.export program)")
    p.add_argument("--format", choices=("auto", "onnx", "torch-export"), default="auto",
                   help="default: from the --out extension (.pt2 -> torch-export, else onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--batch", type=int, default=1, help="example batch size used for tracing")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis")
    p.add_argument("--flip-test", action="store_true", help="student: include the flip test in the graph")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", help="keep BatchNorm layers")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on random crops")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="export without a checkpoint (random initialisation; for testing the pipeline)")


def _load_model(args: argparse.Namespace) -> nn.Module:
    from .models import build_model

    preset = args.preset
    if args.checkpoint:
        from .inference import load_model

        try:  # the architecture the checkpoint records (preset, input size, keypoints, overrides)
            return load_model(preset, args.checkpoint, device="cpu")
        except ValueError as e:
            raise SystemExit(f"export: {e}") from e
    if not args.allow_random_weights:
        raise SystemExit("export: --checkpoint is required (or --allow-random-weights to test the pipeline)")
    if preset is None:
        raise SystemExit("export: --preset is required without a checkpoint")
    return build_model(preset).eval()


def run(args: argparse.Namespace) -> int:
    fmt = args.format
    if fmt == "auto":
        fmt = "torch-export" if args.out.endswith(".pt2") else "onnx"
    if args.batch < 1:
        raise SystemExit(f"export: --batch must be >= 1, got {args.batch}")
    model = _load_model(args)
    t0 = time.perf_counter()
    if fmt == "onnx":
        export_onnx(model, args.out, opset=args.opset, batch=args.batch, dynamic_batch=not args.static_batch,
                    fold_bn=args.fold_bn, flip_test=args.flip_test)
        print(f"wrote {args.out} (ONNX opset {args.opset}, {model.name}, {time.perf_counter() - t0:.1f} s)")
        if args.check:
            batches = (args.batch,) if args.static_batch else (1, 3)
            try:
                errs = check_onnx(args.out, model, batches=batches, flip_test=args.flip_test)
            except AssertionError as e:
                print(f"check FAILED: {e}", file=sys.stderr)
                return 1
            print("check ok (onnxruntime vs PyTorch, max abs error): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    else:
        if args.check:
            print("note: --check applies to ONNX; a torch.export program is checked on load", file=sys.stderr)
        export_program(model, args.out, batch=max(args.batch, 2), dynamic_batch=not args.static_batch,
                       fold_bn=args.fold_bn, flip_test=args.flip_test)
        print(f"wrote {args.out} (torch.export program, {model.name}, {time.perf_counter() - t0:.1f} s)")
    return 0
