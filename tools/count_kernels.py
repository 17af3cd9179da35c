"""Kernels per TDE layer for each inference fusion setting, and of the student step's decoding,
counted on the CPU.

    python tools/count_kernels.py [--json out.json]

At batch 1 a CUDA graph replays the model's kernels back to back, and most of them are small:
the time is roughly the number of kernels times a few microseconds. This counts, for one
TokenDistillingEncoder forward, the Triton launches (the kernels run in the CPU interpreter,
forced on) plus the ATen ops that launch a kernel on a GPU (views, allocations and the
interpreter's own argument copies left out), at depth 4 and depth 2: the difference over 2 is
the count per layer, the rest is outside the layers (patch embedding, token concat, ...). Each
setting's output is compared with the plain encoder's.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from typing import Dict, Tuple

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import distilpose_kernels as dk  # noqa: E402
from distilpose.fileio import atomic_write  # noqa: E402
from distilpose.models.tde import TokenDistillingEncoder  # noqa: E402

#: ATen ops that launch no kernel of their own (views, allocations), and the interpreter's
#: copies of kernel arguments (set_ / copy_), which a GPU launch does not make
NOT_KERNELS = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand", "aten.slice",
    "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias", "aten.as_strided",
    "aten.reshape", "aten.split", "aten.unbind", "aten.empty", "aten.empty_like", "aten.lift_fresh",
    "aten.split_with_sizes", "aten.empty_strided", "aten.unflatten", "aten.flatten", "aten._reshape_alias",
    "aten.new_empty", "aten.set_", "aten.copy_", "aten.promote_types",
}

#: fusion setting -> module flags (TokenDistillingEncoder / Mlp / TokenAttentionBlock attributes)
SETTINGS: Dict[str, dict] = {
    "plain": {},
    "fuse_pos_norm + fuse_mlp": dict(fuse_pos_norm=True, fuse_gelu=True),
    "fp32 engine: + fuse_add_norm + triton_linears": dict(fuse_pos_norm=True, fuse_gelu=True, fuse_add_norm=True,
                                                          triton_linears=True),
    "bf16 engine: + fuse_add_norm + mlp_kernel": dict(fuse_pos_norm=True, fuse_gelu=True, fuse_add_norm=True,
                                                      mlp_kernel=True),
}
_OPS = ("linear", "linear_gelu", "fused_mlp", "linear_add_norm", "fused_mlp_add_norm", "add_pos_layernorm",
        "token_attention")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in NOT_KERNELS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_launches():
    """Count the Triton launches (kernel name -> launches) while the block runs."""
    import triton.runtime.interpreter as interp

    launches: collections.Counter = collections.Counter()
    run = interp.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    interp.InterpretedFunction.run = counted
    try:
        yield launches
    finally:
        interp.InterpretedFunction.run = run


@contextlib.contextmanager
def _forced_triton(names, modules):
    """The model's ``dk.<name>`` calls take the Triton kernels (small tiles) while the block runs."""
    from distilpose_kernels import mlp_triton

    saved = {n: getattr(dk, n) for n in names}
    mlp_triton.TILE_OVERRIDE = mlp_triton.GemmTile(16, 16, 16, 4, 1)
    mlp_triton.MLP_TILE_OVERRIDE = mlp_triton.ADD_NORM_TILE_OVERRIDE = mlp_triton.RowTile(16, 16, 4, 1)
    for name in names:
        fn = getattr(next(m for m in modules if hasattr(m, name)), name)
        setattr(dk, name, lambda *a, _f=fn, **k: _f(*a, **{**k, "backend": "triton"}))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dk, n, f)


def _count(depth: int, flags: dict, launches: collections.Counter) -> Tuple[int, float, dict]:
    torch.manual_seed(0)
    tde = TokenDistillingEncoder(16, feature_size=(8, 6), patch_size=(4, 3), num_keypoints=3, dim=32, depth=depth,
                                 num_heads=2, mlp_dim=48).eval()
    feat = torch.randn(2, 16, 8, 6)
    with torch.no_grad():
        want = tde(feat)
        tde.fuse_pos_norm = flags.get("fuse_pos_norm", False)
        tde.fuse_add_norm = flags.get("fuse_add_norm", False)
        for layer in tde.layers:
            layer.mlp.fuse_gelu = flags.get("fuse_gelu", False)
            layer.mlp.mlp_kernel = flags.get("mlp_kernel", False)
            layer.attn.triton_linears = layer.mlp.triton_linears = flags.get("triton_linears", False)
        launches.clear()
        with _CountOps() as ops:
            got = tde(feat)
    err = max(float((a - b).abs().max()) for a, b in zip(got, want))
    kinds = {**{f"triton:{k}": v for k, v in launches.items()}, **dict(ops.counts)}
    return sum(kinds.values()), err, kinds


def count_kernels() -> Dict[str, dict]:
    """setting -> {"per_layer", "outside_layers", "max_abs_diff", "depth4": {kernel: count}}."""
    from distilpose_kernels import attention, mlp

    out = {}
    with _forced_triton(_OPS, (attention, mlp)), _counting_launches() as launches:
        for name, flags in SETTINGS.items():
            n4, err, kinds = _count(4, flags, launches)
            n2, _, _ = _count(2, flags, launches)
            per_layer = (n4 - n2) // 2
            out[name] = {"per_layer": per_layer, "outside_layers": n4 - 4 * per_layer, "max_abs_diff": err,
                         "depth4": kinds}
    return out


def count_student_decode() -> Dict[str, dict]:
    """Kernels of InferenceEngine's student step after the model (the flip-test merge, crop pixels,
    the inverse affine), with the flip test and without, as PyTorch ops and as the
    regression_to_image kernel (forced on, in the interpreter). The model (and the mirrored input
    it is given) runs its reference ops here and is not counted."""
    from distilpose.models import build_model
    from distilpose.runtime import InferenceEngine
    from distilpose_kernels import keypoints

    model = build_model("distilpose_tiny").eval()
    out = {}
    for decode, names in (("pytorch ops", ()), ("regression_to_image kernel", ("regression_to_image",))):
        for flip in (True, False):
            eng = InferenceEngine(model, device="cpu", flip_test=flip, fold_bn=True, clone_outputs=False)
            img, c, s, r = eng._prepare(torch.randn(1, 3, *model.input_size), torch.full((1, 2), 100.0),
                                        torch.full((1, 2), 150.0), None)
            with torch.no_grad(), _CountOps() as model_ops:
                eng.model(torch.cat((img, img.flip(-1))) if flip else img)
            with torch.no_grad(), _forced_triton(names, (keypoints,)), _counting_launches() as launches, \
                    _CountOps() as step_ops:
                eng._forward_decode(img, c, s, r)
            kinds = {**{f"triton:{k}": v for k, v in launches.items()}, **dict(step_ops.counts - model_ops.counts)}
            out[f"{decode}, {'flip' if flip else 'no flip'}"] = {"decoding": sum(kinds.values()), "kernels": kinds}
    return out


def count_student_head() -> Dict[str, dict]:
    """Kernels of the student's regression head on keypoint tokens sliced from the token stream
    (as the TDE returns them): PyTorch ops (LayerNorm, Linear, sigmoid, softplus) vs the
    regression_head kernel (forced on, in the interpreter); outputs compared."""
    from distilpose.models.heads import RegressionHead
    from distilpose_kernels import heads

    torch.manual_seed(0)
    head = RegressionHead(32).eval()
    tokens = torch.randn(2, 3 + 12, 32)[:, :3]
    out, ref = {}, None
    for name, fused in (("pytorch ops", False), ("regression_head kernel", True)):
        head.fused = fused
        names = ("regression_head",) if fused else ()
        with torch.no_grad(), _forced_triton(names, (heads,)), _counting_launches() as launches, _CountOps() as ops:
            got = head(tokens)
        kinds = {**{f"triton:{k}": v for k, v in launches.items()}, **dict(ops.counts)}
        vals = torch.cat([got[k] for k in ("coords", "score", "sigma")], -1)
        ref = vals if ref is None else ref
        out[name] = {"head": sum(kinds.values()), "kernels": kinds, "max_abs_diff": float((vals - ref).abs().max())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    res = count_kernels()
    for name, r in res.items():
        print(f"{name:<48} {r['per_layer']:3d} kernels per layer, {r['outside_layers']:2d} outside the layers "
              f"(max |diff| vs plain {r['max_abs_diff']:.1e})")
    dec = count_student_decode()
    for name, r in dec.items():
        print(f"student step decoding, {name:<36} {r['decoding']:3d} kernels")
    head = count_student_head()
    for name, r in head.items():
        print(f"student head, {name:<45} {r['head']:3d} kernels (max |diff| {r['max_abs_diff']:.1e})")
    if args.json:
        atomic_write(args.json, json.dumps({"tde": res, "student_decode": dec, "student_head": head}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
